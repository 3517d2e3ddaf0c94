"""capa-export: CAPA (contribution-aware visual-token pruning + FFN approximation) for LVLMs,
from a Hugging Face model to validated ONNX Runtime / TensorRT engines.

Public API (tests and users rely on these names):
    load_model, contribution_scores, CapaConfig, apply_capa, CapaModel, fit_ffn_approximation,
    FfnApproximation, CapaError
"""

__version__ = "0.1.0"

from .method.ffn import FfnApproximation, fit_ffn_approximation
from .method.capa_model import CapaModel, apply_capa
from .method.scoring import contribution_scores
from .config import CapaConfig
from .errors import CapaError
from .models import load_model

__all__ = ["CapaConfig", "CapaError", "CapaModel", "FfnApproximation", "apply_capa", "contribution_scores",
           "fit_ffn_approximation", "load_model", "__version__"]
