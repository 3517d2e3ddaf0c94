"""Model families: the only package that knows where a family keeps its parts (see base.py)."""

from .base import LayerParts, ModelAdapter, ModelFamily, cast_model, fingerprints_match
from .registry import (adapter_for, embedded_models, families, family_for_model_type, family_from_info, load_model,
                       supported_model_types)

__all__ = ["LayerParts", "ModelAdapter", "ModelFamily", "adapter_for", "cast_model", "embedded_models", "families",
           "family_for_model_type", "family_from_info", "fingerprints_match", "load_model", "supported_model_types"]
