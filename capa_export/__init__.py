"""capa-export: CAPA (contribution-aware visual-token pruning + FFN approximation) for LVLMs,
from a Hugging Face model to validated ONNX Runtime / TensorRT engines.

Public API (tests and users rely on these names):
    one function per CLI command (capa_export/api.py): analyze, calibrate, generate, export_onnx,
    build, validate_engine, and CapaEngine (run); `export_onnx` and `validate_engine` because
    `capa_export.export` and `capa_export.validate` are the subpackage and module doing that work
    the method itself: load_model, contribution_scores, CapaConfig, apply_capa, CapaModel,
    fit_ffn_approximation, FfnApproximation, CapaError
"""

__version__ = "0.1.0"

from .method.ffn import FfnApproximation, fit_ffn_approximation
from .method.capa_model import CapaModel, apply_capa
from .method.scoring import contribution_scores
from .config import CapaConfig
from .errors import CapaError
from .models import load_model
from .api import analyze, build, calibrate, export_onnx, generate, validate_engine

__all__ = ["CapaConfig", "CapaEngine", "CapaError", "CapaModel", "FfnApproximation", "analyze", "apply_capa", "build",
           "calibrate", "contribution_scores", "export_onnx", "fit_ffn_approximation", "generate", "load_model",
           "validate_engine", "__version__"]


def __getattr__(name):
    if name == "CapaEngine":  # ONNX Runtime is imported when an engine is first used, not with the package
        from .runtime import CapaEngine

        return CapaEngine
    raise AttributeError(f"module 'capa_export' has no attribute {name!r}")
