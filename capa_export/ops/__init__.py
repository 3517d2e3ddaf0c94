"""CapaContribTopK as a runnable op: PyTorch custom op, native (C++/CUDA) bindings, ONNX Runtime op.

Importing this package registers `torch.ops.capa.contrib_topk`. In ONNX graphs the op is a node with
an ONNX local function (`onnx_function.py`) that every ONNX runtime can run.
"""

from __future__ import annotations

import torch

from capa_export.ops import native
from capa_export.ops.native import VARIANT_CODES, variant_code, variant_name
from capa_export.ops.torch_op import OP_NAME, contribution_scores, validate_inputs

__all__ = [
    "OP_NAME",
    "VARIANT_CODES",
    "contrib_topk",
    "contribution_scores",
    "native",
    "validate_inputs",
    "variant_code",
    "variant_name",
]


def contrib_topk(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str | int = "contrib"
) -> torch.Tensor:
    """int32 [B, k] kept key indices via `torch.ops.capa.contrib_topk` (CPU, CUDA or fake tensors)."""
    return torch.ops.capa.contrib_topk(probs, values, o_weight, k, variant_name(variant))
