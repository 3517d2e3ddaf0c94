"""The backend interface (after Polygraphy's backend/<name>/{loader,runner}): an engine backend
checks a build request before any work, builds engine files from the exported ONNX graphs, and
gives a Polygraphy runner per graph, so validation and the runtime never know which backend they
drive. A new backend is one module in this package with a `@register_backend` class."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from ..contract import GraphContract
from ..errors import CapaError

BACKENDS: dict[str, "Backend"] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    BACKENDS[cls.name] = cls()
    return cls


class Backend(abc.ABC):
    name: ClassVar[str]
    #: "auto" picks the available backend with the highest priority
    auto_priority: ClassVar[int] = 0

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (None when it can)."""
        return None

    def require(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise CapaError(reason)

    def check(self, profile, config, *, plugin_library: str | None = None) -> None:
        """Refuse, in one line and before any work, what this backend cannot build (limits, a
        missing provider or plugin library)."""

    @abc.abstractmethod
    def build(self, onnx_dir: Path, profile, out_dir: Path, contract: GraphContract, *, fixed_dims: dict,
              plugin_library: str | None = None) -> dict:
        """Build every graph of `contract` from onnx_dir into out_dir; returns a JSON-able
        description (recorded in the engine manifest)."""

    @abc.abstractmethod
    def runner(self, engine_dir: Path, graph: str):
        """A Polygraphy runner for one graph of a built engine."""
