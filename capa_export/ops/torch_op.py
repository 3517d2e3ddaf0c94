"""PyTorch custom op `torch.ops.capa.contrib_topk(probs, values, o_weight, k, variant)`.

Registered when this module is imported (importing `capa_export.ops` does it). Kernels:
  CPU   the scores as matrix products in ATen (capa_export.method.scoring: the Gram form, chunked
        over keys, fp32 accumulation), then the top-k. The C++ reference in capa_export._native
        computes the same with scalar loops and is kept as a test reference, not run here (about
        20x slower: 865 ms against 42 ms at the benchmark's mid size);
  CUDA  the CUDA kernels through the raw-pointer binding, on torch's current stream (without a
        CUDA build of capa_export._native: the CPU kernel's ATen code on the GPU, with a warning);
  fake  int32 [B, k] (torch.compile / export / meta tensors).
"""

from __future__ import annotations

import logging

import torch

from capa_export.method import scoring
from capa_export.ops import native

OP_NAME = "capa::contrib_topk"
_warned_no_cuda_kernels = False


def validate_inputs(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str) -> None:
    """ValueError naming the argument that is wrong (shapes, dtypes, variant, k, devices)."""
    scoring.check_scoring_inputs(probs, values, o_weight, variant)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    n = probs.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, {n}] (N, the number of visual keys in probs)")
    if not (probs.device == values.device == o_weight.device):
        raise ValueError(
            f"probs, values and o_weight must be on one device; got {probs.device}, {values.device}, {o_weight.device}"
        )


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cpu")
def contrib_topk(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str = "contrib"
) -> torch.Tensor:
    """int32 [B, k]: the k keys with the largest contribution scores, ascending, ties to the lower index."""
    validate_inputs(probs, values, o_weight, k, variant)
    return scoring.contrib_topk(probs, values, o_weight, k, variant)


@contrib_topk.register_kernel("cuda")
def _contrib_topk_cuda(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str = "contrib"
) -> torch.Tensor:
    validate_inputs(probs, values, o_weight, k, variant)
    if not native.cuda_compiled():
        # pip install on a machine without nvcc: the same scores as ATen matrix products on the GPU
        # (the CPU kernel's code), slower than the kernels; said once per process
        global _warned_no_cuda_kernels
        if not _warned_no_cuda_kernels:
            reason = native.unavailable_reason() or "capa_export._native was built without CUDA (no nvcc at build time)"
            logging.getLogger(__name__).warning("capa::contrib_topk on CUDA runs as ATen matrix products: %s", reason)
            _warned_no_cuda_kernels = True
        return scoring.contrib_topk(probs, values, o_weight, k, variant)
    ext = native.module()
    probs, values, o_weight = probs.contiguous(), values.contiguous(), o_weight.contiguous()
    b, h, q, n = probs.shape
    h_kv, d = values.shape[1], values.shape[3]
    big_d = o_weight.shape[0]
    code = native.variant_code(variant)
    out = torch.empty((b, k), dtype=torch.int32, device=probs.device)
    ws_bytes = ext.contrib_topk_workspace_size(b, h, h_kv, q, n, d, big_d, k, code)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=probs.device)
    with torch.cuda.device(probs.device):
        stream = torch.cuda.current_stream(probs.device).cuda_stream
        ext.contrib_topk_cuda(
            probs.data_ptr(), values.data_ptr(), o_weight.data_ptr(), out.data_ptr(),
            b, h, h_kv, q, n, d, big_d, k, code, native.dtype_code(probs.dtype), stream,
            workspace.data_ptr(), ws_bytes,
        )
    return out


@contrib_topk.register_fake
def _contrib_topk_fake(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str = "contrib"
) -> torch.Tensor:
    if variant not in scoring.VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; expected one of {', '.join(scoring.VARIANTS)}")
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, H, Q, N] (rank 4), got shape {tuple(probs.shape)}")
    return probs.new_empty((probs.shape[0], k), dtype=torch.int32)


def contribution_scores(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, variant: str = "contrib"
) -> torch.Tensor:
    """fp32 [B, N] scores on CPU: the C++ reference when built, else the Python one (for tests and analysis)."""
    scoring.check_scoring_inputs(probs, values, o_weight, variant)
    if probs.device.type == "cpu" and native.available() and probs.dtype in native.DTYPE_CODES:
        out = native.module().contribution_scores_cpu(
            probs.contiguous(), values.contiguous(), o_weight.contiguous(), native.variant_code(variant)
        )
        return torch.from_numpy(out)
    return scoring.contribution_scores(probs, values, o_weight, variant=variant)


def output_gram(o_weight: torch.Tensor) -> torch.Tensor:
    """M = o_weight^T o_weight, [H*d, H*d] in o_weight's dtype (accumulated in fp32): its (h, g) block of
    d x d is K[h,g] = W_O^h W_O^g^T, with which the contrib score's per-key Gram matrix is
    G_j[h,g] = v_j^h^T K[h,g] v_j^g. Constant per layer: computed once, not per call."""
    w = o_weight.float()
    gram = (w.T @ w).to(o_weight.dtype)
    if not bool(torch.isfinite(gram).all()):
        # fp16 overflows when a column of o_weight has a norm above 256: every score would be inf/NaN
        raise ValueError(f"o_weight^T o_weight does not fit {o_weight.dtype} (largest |entry| "
                         f"{float((w.T @ w).abs().max()):.3g}); use bfloat16 or the direct kernels")
    return gram


def contribution_scores_gram_cuda(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, o_gram: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 [B, N] contrib scores from the Gram-form tensor-core kernels (issue 16's candidate; NOT YET RUN
    ON A GPU, not used by the op or the plugin). fp16/bf16 CUDA tensors; ValueError when the kernels do not
    support the shape (d in {16, 32, 64, 128, 256}, H <= 83) or dtype."""
    scoring.check_scoring_inputs(probs, values, o_weight, "contrib")
    if probs.device.type != "cuda":
        raise ValueError(f"contribution_scores_gram_cuda runs on CUDA tensors, got {probs.device}")
    if not native.cuda_compiled():
        raise RuntimeError(f"the Gram-form kernels need the CUDA build: {native.unavailable_reason() or 'built without nvcc'}")
    ext = native.module()
    probs, values = probs.contiguous(), values.contiguous()
    o_gram = (output_gram(o_weight) if o_gram is None else o_gram).contiguous()
    b, h, q, n = probs.shape
    h_kv, d = values.shape[1], values.shape[3]
    if tuple(o_gram.shape) != (h * d, h * d) or o_gram.dtype != probs.dtype or o_gram.device != probs.device:
        raise ValueError(f"o_gram must be [{h * d}, {h * d}] {probs.dtype} on {probs.device}, got "
                         f"{tuple(o_gram.shape)} {o_gram.dtype} on {o_gram.device}")
    big_d = o_weight.shape[0]
    scores = torch.empty((b, n), dtype=torch.float32, device=probs.device)
    ws_bytes = ext.contrib_gram_workspace_size(b, h, h_kv, q, n, d, big_d)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=probs.device)
    with torch.cuda.device(probs.device):
        stream = torch.cuda.current_stream(probs.device).cuda_stream
        ext.contribution_scores_gram_cuda(
            probs.data_ptr(), values.data_ptr(), o_gram.data_ptr(), scores.data_ptr(), b, h, h_kv, q, n, d, big_d,
            native.dtype_code(probs.dtype), stream, workspace.data_ptr(), ws_bytes,
        )
    return scores
