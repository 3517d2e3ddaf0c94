"""Engine backends, each a module with a `@register_backend` class (see base.py); found by name."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..errors import CapaError
from .base import BACKENDS, Backend, register_backend

_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if module.name != "base":
                importlib.import_module(f"{__package__}.{module.name}")


def names() -> list[str]:
    _discover()
    return sorted(BACKENDS, key=lambda n: -BACKENDS[n].auto_priority)


def get(name: str) -> Backend:
    """The backend called `name`; "auto" -> the available one with the highest priority."""
    _discover()
    if name == "auto":
        return next(BACKENDS[n] for n in names() if BACKENDS[n].unavailable_reason() is None)
    if name not in BACKENDS:
        raise CapaError(f"backend {name!r} is unknown; expected auto, {', '.join(names())}")
    backend = BACKENDS[name]
    backend.require()
    return backend


__all__ = ["Backend", "get", "names", "register_backend"]
