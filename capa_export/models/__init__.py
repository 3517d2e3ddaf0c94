"""Model families: the only package that knows where a family keeps its parts."""

from .base import LayerParts, ModelAdapter, fingerprints_match
from .registry import EMBEDDED_MODELS, adapter_class, adapter_for, load_model, parse_dtype, supported_model_types

__all__ = ["LayerParts", "ModelAdapter", "adapter_class", "adapter_for", "fingerprints_match", "load_model", "parse_dtype",
           "supported_model_types", "EMBEDDED_MODELS"]
