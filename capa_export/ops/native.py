"""The compiled extension `capa_export._native`, loaded lazily, with a clear reason when absent."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from capa_export.method.scoring import VARIANTS
from capa_export.ops.spec import SPEC

# Integer encodings shared with the ONNX / TensorRT INT attribute `variant` and the C API.
VARIANT_CODES: dict[str, int] = dict(SPEC.variants)  # contrib=0, value_norm=1, attention=2
DTYPE_CODES: dict[torch.dtype, int] = {getattr(torch, name): code for name, code in SPEC.dtypes.items()}

_module: ModuleType | None = None
_reason: str | None = None
_tried = False


def _load() -> None:
    global _module, _reason, _tried
    if _tried:
        return
    _tried = True
    try:
        _module = importlib.import_module("capa_export._native")
    except ImportError as exc:  # not built (no C++ compiler at install time) or built for another Python
        _reason = (
            f"capa_export._native is not importable ({exc}); rebuild it with a C++ compiler: "
            "pip install --no-build-isolation -e ."
        )


def available() -> bool:
    """True when the C++ extension is importable."""
    _load()
    return _module is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _load()
    return _reason


def module() -> ModuleType:
    """The extension module; RuntimeError with the reason when it is absent."""
    _load()
    if _module is None:
        raise RuntimeError(_reason)
    return _module


def cuda_compiled() -> bool:
    """True when the extension was built with the CUDA kernels (says nothing about a GPU being present)."""
    return available() and bool(module().cuda_compiled())


def variant_code(variant: str | int) -> int:
    """'contrib' / 'value_norm' / 'attention' (or 0 / 1 / 2) -> 0 / 1 / 2; ValueError otherwise."""
    if isinstance(variant, bool):
        raise ValueError(f"variant={variant!r} is unknown; expected one of {', '.join(VARIANTS)} or 0/1/2")
    if isinstance(variant, int):
        if 0 <= variant < len(VARIANTS):
            return variant
    elif variant in VARIANT_CODES:
        return VARIANT_CODES[variant]
    raise ValueError(f"variant={variant!r} is unknown; expected one of {', '.join(VARIANTS)} or 0/1/2")


def variant_name(variant: str | int) -> str:
    """Inverse of `variant_code`: the variant's string name."""
    return VARIANTS[variant_code(variant)]


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {dtype} is not supported by the native op; expected float32, float16 or bfloat16")
    return DTYPE_CODES[dtype]
