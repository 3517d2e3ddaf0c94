"""Which family serves which model, the embedded models, and `load_model`.

Families register themselves where they are defined (`@register_family` on the family class,
`@embedded_model` on a tiny builder); every module of this package is imported on first lookup, so
a new family is one new file here and nothing else changes.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Callable

from ..dtypes import torch_dtype
from ..errors import CapaError
from .base import ModelAdapter, ModelFamily

FAMILIES: dict[str, type[ModelFamily]] = {}
#: name -> (family name, builder(dtype) -> (model, processor)): models built in code, offline
EMBEDDED: dict[str, tuple[str, Callable]] = {}
_INFRASTRUCTURE = {"base", "registry"}
_discovered = False


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family (with its `adapter` class) known by name and model types."""
    if not family.name or not family.model_types or not hasattr(family, "adapter"):
        raise TypeError(f"{family.__name__} needs a name, model_types and an adapter class")
    family.adapter.family_class = family
    FAMILIES[family.name] = family
    return family


def embedded_model(name: str, family: str):
    """Function decorator: a builder of a model made in code (no file read, no download)."""

    def register(builder: Callable) -> Callable:
        EMBEDDED[name] = (family, builder)
        return builder

    return register


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__package__}.{module.name}")


def families() -> dict[str, type[ModelFamily]]:
    _discover()
    return FAMILIES


def embedded_models() -> dict[str, tuple[str, Callable]]:
    _discover()
    return EMBEDDED


def supported_model_types() -> list[str]:
    return sorted(t for family in families().values() for t in family.model_types)


def family_for_model_type(model_type: str | None, source: str = "") -> type[ModelFamily]:
    for family in families().values():
        if model_type in family.model_types:
            return family
    where = f" of {source}" if source else ""
    raise CapaError(f"model type {model_type!r}{where} has no capa-export adapter; "
                    f"supported: {', '.join(supported_model_types())}")


def adapter_for(model) -> ModelAdapter:
    return family_for_model_type(getattr(model.config, "model_type", None)).adapter(model)


def family_from_info(info: dict) -> ModelFamily:
    """The family of a model described by `ModelAdapter.describe()` (e.g. from an engine manifest)."""
    name = info.get("family")
    if name not in families():
        raise CapaError(f"model family {name!r} has no adapter; supported: {', '.join(families())}")
    return families()[name](info)


def load_model(name_or_path: str, dtype=None, device=None):
    """(model, processor) for an embedded model (e.g. `tiny-llava`), a local directory, or a hub id.

    Real checkpoints go through `from_pretrained`; the family must have an adapter, checked from
    the config before any weight is read.
    """
    dtype = torch_dtype(dtype)
    if name_or_path in embedded_models():
        import torch

        model, processor = embedded_models()[name_or_path][1](dtype=dtype or torch.float32)
    else:
        model, processor = _load_pretrained(name_or_path, dtype)
    if device is not None:
        model = model.to(device)
    adapter_for(model)  # fail early, naming the supported families
    return model.eval(), processor


#: A checkpoint folder's processor: an image-processor config and a tokenizer.
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_checkpoint_folder(path: Path) -> None:
    """A local checkpoint folder, before transformers reads it: no config carrying `auto_map`
    (it names code to import from the folder), and processor files present (refused in one line
    now, not after minutes of loading weights)."""
    from ..folders import MAX_PROCESSOR_JSON_BYTES, find_key, key_path, read_json

    for config in sorted(path.glob("*.json")):
        if config.is_symlink() or not config.is_file():
            continue  # weights and configs may be links into a cache (HF's snapshot layout); read by transformers
        found = find_key(read_json(config, max_bytes=MAX_PROCESSOR_JSON_BYTES), "auto_map")
        if found is not None:
            raise CapaError(f"{config}: {key_path(found)} names custom code; capa-export never runs code from a model "
                            f"folder: use a checkpoint saved with built-in transformers classes")
    if not any((path / name).exists() for name in IMAGE_PROCESSOR_FILES) or \
            not any((path / name).exists() for name in TOKENIZER_FILES):
        raise CapaError(f"model directory {path} has no processor files (one of {', '.join(IMAGE_PROCESSOR_FILES)} and "
                        f"one of {', '.join(TOKENIZER_FILES)}); save the processor there too "
                        f"(processor.save_pretrained)")


def _load_pretrained(name_or_path: str, dtype):
    """A real checkpoint: a local directory (read only there: local_files_only) or a hub id the user
    named. Never remote code (trust_remote_code=False); the processor is loaded before the weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    embedded = ", ".join(embedded_models())
    if looks_local and not path.is_dir():
        raise CapaError(f"model path {name_or_path} does not exist; give a model directory, a hub id, "
                        f"or one of: {embedded}")
    local = path.is_dir()
    options = {"trust_remote_code": False, "local_files_only": local}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as exc:
        # offline, huggingface_hub retries the connection for tens of seconds: say how to skip that
        offline = "" if local or os.environ.get("HF_HUB_OFFLINE") else " (on a machine without the hub, HF_HUB_OFFLINE=1 makes this fail at once)"
        raise CapaError(f"cannot load a model config from {name_or_path!r} ({str(exc).splitlines()[0]}); give a "
                        f"directory with config.json, a reachable hub id, or one of: {embedded}{offline}") from None
    family = family_for_model_type(config.model_type, name_or_path)
    if local:  # before the weights: a folder without its processor fails in one line, not after minutes
        check_checkpoint_folder(path)
    try:
        processor = family.load_processor(name_or_path, **options)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CapaError(f"cannot load the processor of {name_or_path!r} ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); save the processor "
                        f"with the model (processor.save_pretrained)") from None
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or "auto", **options)
    return model, processor
