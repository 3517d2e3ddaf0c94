"""The backend interface (after Polygraphy's backend/<name>/{loader,runner}): an engine backend
checks a build request before any work, builds engine files from the exported ONNX graphs, and
gives a Polygraphy runner per graph, so validation and the runtime never know which backend they
drive. A new backend is one module in this package with a `@register_backend` class."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from ..contract import FLOAT, FLOAT32, INT32, INT64, GraphContract, GraphSpec
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

    def check_precision(self, profile) -> None:
        """Refuse, in one line, a precision this backend cannot run here."""

    def check(self, profile, config, *, plugin_library: str | None = None, max_visual: int | None = None) -> None:
        """Refuse, in one line and before any work, what this backend cannot build (limits, a
        missing provider or plugin library). max_visual: the most visual tokens an image the engine
        takes gives (a keep fraction's largest k), when known."""

    @abc.abstractmethod
    def build(self, onnx_dir: Path, profile, out_dir: Path, contract: GraphContract, *, fixed_dims: dict,
              plugin_library: str | None = None) -> dict:
        """Build every graph of `contract` from onnx_dir into out_dir; returns a JSON-able
        description (recorded in the engine manifest)."""

    def check_folder(self, backend_dir: Path, files: dict) -> dict:
        """Read and check the backend's own description file in backend_dir (its schema, every path
        it names confined to backend_dir and listed in files, the engine's verified table relative
        to backend_dir) before anything is loaded; returns it. Needs no backend runtime installed,
        so a hostile folder is refused the same way everywhere."""
        return {}

    @abc.abstractmethod
    def runner(self, engine_dir: Path, graph: str, *, spec: GraphSpec | None = None, dtype: str = "fp32",
               files: dict | None = None, plugin_library: str | None = None, allow_engine_code: bool = False):
        """A Polygraphy runner for one graph of a built engine.

        spec: the graph's inputs and outputs as the model family defines them: the engine file's
        own are checked against them before a session exists (dtype: the engine's float type).
        files: the engine's file table relative to engine_dir, for backends that read files as
        bytes (checked against their sha256 as read). plugin_library / allow_engine_code: native
        code a backend may load (the installed plugin, or one the user names; code carried inside
        an engine file only when the user opts in)."""


    def graph(self, engine_dir: Path, graph: str, *, spec: GraphSpec, dtype: str = "fp32", files: dict | None = None,
              provider: str | None = None, threads: int | None = None, plugin_library: str | None = None,
              allow_engine_code: bool = False) -> "EngineGraph":
        """One graph of a built engine, ready to run on torch tensors (the runtime's and
        validation's way in). provider / threads: where and on how many threads it runs, for
        backends that choose. The default runs the backend's Polygraphy runner (numpy feeds);
        a backend that can keep tensors where it runs them overrides it."""
        if provider is not None or threads is not None:
            raise CapaError(f"the {self.name} backend takes no --provider / --threads")
        return RunnerGraph(self.runner(engine_dir, graph, spec=spec, dtype=dtype, files=files,
                                       plugin_library=plugin_library, allow_engine_code=allow_engine_code), spec, dtype)


class EngineGraph:
    """One graph of an engine. `run` takes the contract's inputs by name, as torch tensors or as
    handles an earlier `run` of the same engine returned (which stay where the backend keeps them:
    a decode step's KV cache is never copied to the host), and returns its outputs as handles;
    `tensor(handle)` gives a torch tensor."""

    spec: GraphSpec

    def run(self, inputs: dict) -> dict:
        raise NotImplementedError

    def tensor(self, handle) -> "torch.Tensor":
        return handle

    def close(self) -> None:
        pass


class RunnerGraph(EngineGraph):
    """An EngineGraph over a Polygraphy runner (numpy in and out; handles are torch tensors)."""

    def __init__(self, runner, spec: GraphSpec, dtype: str):
        self.runner, self.spec, self.dtype = runner, spec, dtype
        runner.activate()

    def run(self, inputs: dict) -> dict:
        import numpy as np
        import torch

        from ..contract import to_feed_array

        feed = {t.name: to_feed_array(t, inputs[t.name], self.dtype) for t in self.spec.inputs}
        # copies: runners may reuse their output buffers between calls
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.runner.infer(feed).items()}

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()


#: ONNX TensorProto element types of the contract's tensor types (FLOAT: the engine's float type).
_ONNX_TYPES = {FLOAT32: 1, INT64: 7, INT32: 6}


def check_graph_io(spec: GraphSpec, inputs: dict, outputs: dict, dtype: str, source: str) -> None:
    """The engine file's inputs and outputs ({name: ONNX element type, or None where the backend
    does not say}) must be exactly the
    family's spec: an input it does not expect cannot be fed, and an extra output is work (or a
    huge allocation) nobody asked for."""
    from ..dtypes import float_type

    def expected(tensors):
        return {t.name: float_type(dtype).onnx if t.dtype == FLOAT else _ONNX_TYPES[t.dtype] for t in tensors}

    for what, found, wanted in (("input", inputs, expected(spec.inputs)), ("output", outputs, expected(spec.outputs))):
        extra = [n for n in found if n not in wanted]
        if extra:
            raise CapaError(f"{source} has an {what} {str(extra[0])[:60]!r} that the {spec.name} graph does not have "
                            f"({len(extra)} in all); rebuild the engine")
        missing = [n for n in wanted if n not in found]
        if missing:
            raise CapaError(f"{source} lacks the {what} {missing[0]!r} of the {spec.name} graph; rebuild the engine")
        wrong = [n for n in wanted if found[n] is not None and found[n] != wanted[n]]
        if wrong:
            raise CapaError(f"{source}: {what} {wrong[0]!r} has ONNX element type {found[wrong[0]]}, the {spec.name} "
                            f"graph's is {wanted[wrong[0]]}; rebuild the engine")
