"""Which adapter serves which model, and `load_model`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CapaError
from .base import ModelAdapter
from .llava import LlavaAdapter
from .tiny import TINY_NAME, build_tiny_llava

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter,)
EMBEDDED_MODELS = (TINY_NAME,)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise CapaError(
        f"model type {model_type!r} has no capa-export adapter; supported: {', '.join(supported_model_types())}"
    )


def adapter_class(family: str) -> type[ModelAdapter]:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise CapaError(f"model family {family!r} has no adapter; supported: {', '.join(a.family for a in ADAPTERS)}")


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise CapaError(f"dtype {dtype!r} is unknown; expected one of fp32, fp16, bf16")
    return _DTYPES[dtype]


def load_model(name_or_path: str, dtype=None, device=None):
    """(model, processor) for the embedded `tiny-llava`, a local directory, or a hub id.

    Real checkpoints go through `from_pretrained`; the family must have an adapter, checked from
    the config before any weight is read.
    """
    torch_dtype = parse_dtype(dtype)
    if name_or_path == TINY_NAME:
        model, processor = build_tiny_llava(dtype=torch_dtype or torch.float32)
    else:
        model, processor = _load_pretrained(name_or_path, torch_dtype)
    if device is not None:
        model = model.to(device)
    adapter_for(model)  # fail early, naming the supported families
    return model.eval(), processor


def _load_pretrained(name_or_path: str, dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise CapaError(f"model path {name_or_path} does not exist; give a model directory, a hub id, "
                        f"or one of: {', '.join(EMBEDDED_MODELS)}")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise CapaError(f"cannot load a model config from {name_or_path!r} ({str(exc).splitlines()[0]}); give a "
                        f"directory with config.json, a reachable hub id, or one of: {', '.join(EMBEDDED_MODELS)}") from None
    if config.model_type not in supported_model_types():
        raise CapaError(f"model type {config.model_type!r} of {name_or_path} has no capa-export adapter; "
                        f"supported: {', '.join(supported_model_types())}")
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or "auto")
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model, processor
