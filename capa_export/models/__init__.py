"""Model families: the only package that knows where a family keeps its parts."""

from .base import LayerParts, ModelAdapter, cast_model, fingerprints_match
from .registry import EMBEDDED_MODELS, adapter_class, adapter_for, load_model, parse_dtype, supported_model_types

__all__ = ["LayerParts", "ModelAdapter", "cast_model", "adapter_class", "adapter_for", "fingerprints_match", "load_model", "parse_dtype",
           "supported_model_types", "EMBEDDED_MODELS"]
