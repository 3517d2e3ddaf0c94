"""The one table of floating-point types: what each is called by the CLI and the profiles, by torch,
numpy and ONNX, and how the native op encodes it. Every module that converts between these asks
here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import CapaError


@dataclass(frozen=True)
class FloatType:
    name: str  # what users type: fp32, fp16, bf16
    torch: torch.dtype
    numpy: type | None  # numpy has no bfloat16
    onnx: int  # onnx.TensorProto data type

    @property
    def numpy_or_fail(self) -> type:
        if self.numpy is None:
            raise CapaError(f"{self.name} tensors cannot be passed as numpy arrays (numpy has no {self.name})")
        return self.numpy


# onnx.TensorProto.FLOAT / FLOAT16 / BFLOAT16 (literal values: importing onnx here would slow every CLI start)
FLOAT_TYPES: dict[str, FloatType] = {
    "fp32": FloatType("fp32", torch.float32, np.float32, 1),
    "fp16": FloatType("fp16", torch.float16, np.float16, 10),
    "bf16": FloatType("bf16", torch.bfloat16, None, 16),
}
NAMES = tuple(FLOAT_TYPES)
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def float_type(value) -> FloatType:
    """fp32 / fp16 / bf16 (or float32, float16, bfloat16, or a torch dtype) -> FloatType."""
    if isinstance(value, FloatType):
        return value
    if isinstance(value, torch.dtype):
        for entry in FLOAT_TYPES.values():
            if entry.torch == value:
                return entry
        raise CapaError(f"dtype {value} is not supported; expected one of {', '.join(NAMES)}")
    name = _ALIASES.get(value, value)
    if name not in FLOAT_TYPES:
        raise CapaError(f"dtype {value!r} is unknown; expected one of {', '.join(NAMES)}")
    return FLOAT_TYPES[name]


def torch_dtype(value) -> torch.dtype | None:
    """None stays None (meaning: the checkpoint's own dtype)."""
    return None if value is None else float_type(value).torch


def name_of(dtype: torch.dtype) -> str:
    return float_type(dtype).name
