"""Engine backends. Each answers `build(onnx_dir, profile, out_dir, ...)` and
`runner(engine_dir, graph)` (a Polygraphy runner), so validation and the runtime do not know which
backend they drive. `tensorrt` is imported lazily, only by the TensorRT backend."""

from __future__ import annotations

from ..errors import CapaError
from . import ort, trt

BACKENDS = {ort.NAME: ort, trt.NAME: trt}


def resolve(name: str) -> str:
    """'auto' -> TensorRT where installed, else ONNX Runtime."""
    if name == "auto":
        return trt.NAME if trt.unavailable_reason() is None else ort.NAME
    if name not in BACKENDS:
        raise CapaError(f"backend {name!r} is unknown; expected auto, {', '.join(BACKENDS)}")
    if name == trt.NAME:
        trt.require()
    return name


def get(name: str):
    return BACKENDS[resolve(name)]
