"""Attention contribution: the CAPA pruning criterion (docs/method.md).

This module is the one definition of the op's semantics. Every other implementation (the C++
reference, the CUDA kernel, the ONNX lowering, the TensorRT plugin) is tested against it and
against a brute-force float64 computation.
"""

from __future__ import annotations

import torch

VARIANTS = ("contrib", "value_norm", "attention")

# Bound on the U = v W_O intermediate of the contrib variant, in elements: keys are processed in
# chunks so the working set stays O(chunk * H * D), never O(N * H * D).
_CONTRIB_CHUNK_ELEMENTS = 1 << 24


def check_scoring_inputs(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, variant: str) -> None:
    """Raise ValueError naming the argument whose shape, type or value is wrong."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; expected one of {', '.join(VARIANTS)}")
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, H, Q, N] (rank 4), got shape {tuple(probs.shape)}")
    if values.dim() != 4:
        raise ValueError(f"values must be [B, H_kv, N, d] (rank 4), got shape {tuple(values.shape)}")
    if o_weight.dim() != 2:
        raise ValueError(f"o_weight must be [D, H*d] (rank 2, nn.Linear layout), got shape {tuple(o_weight.shape)}")
    b, h, _, n = probs.shape
    vb, h_kv, vn, d = values.shape
    if vb != b:
        raise ValueError(f"values batch {vb} does not match probs batch {b}")
    if vn != n:
        raise ValueError(f"values has {vn} keys but probs has {n}; both must cover the same N visual keys")
    if h_kv <= 0 or h % h_kv != 0:
        raise ValueError(f"probs heads H={h} must be a multiple of values heads H_kv={h_kv} (grouped-query attention)")
    if o_weight.shape[1] != h * d:
        raise ValueError(f"o_weight has {o_weight.shape[1]} input columns; expected H*d = {h}*{d} = {h * d}")
    if not (probs.dtype == values.dtype == o_weight.dtype):
        raise ValueError(
            f"probs, values and o_weight must share one dtype; got {probs.dtype}, {values.dtype}, {o_weight.dtype}"
        )
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got {probs.dtype}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate in fp32 whatever the input type (fp64 stays fp64, for references).
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv_heads(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, H_kv, N, d] -> [B, H, N, d]; head h reads kv head h // (H / H_kv), as HF's repeat_kv."""
    h_kv = values.shape[1]
    if h_kv == num_heads:
        return values
    return values.repeat_interleave(num_heads // h_kv, dim=1)


def contribution_scores(
    probs: torch.Tensor,
    values: torch.Tensor,
    o_weight: torch.Tensor,
    *,
    variant: str = "contrib",
) -> torch.Tensor:
    """Score N visual keys by what the Q scoring queries take from them.

    probs    [B, H, Q, N]  attention probabilities (softmax already taken over *all* keys);
                           rows of queries that should not score can be zero.
    values   [B, H_kv, N, d]
    o_weight [D, H*d]      o_proj weight in nn.Linear layout (out = x @ o_weight.T)
    returns  [B, N]        C_j = sum_i c_ij, in fp32 (fp64 for fp64 inputs)

    contrib:    c_ij = || sum_h a_ij^h v_j^h W_O^h ||_2        (CAPA eq. 2)
    value_norm: c_ij = sum_h a_ij^h || v_j^h ||_2
    attention:  c_ij = sum_h a_ij^h                              (FastV)
    """
    check_scoring_inputs(probs, values, o_weight, variant)
    acc = _accumulation_dtype(probs.dtype)
    a = probs.to(acc)
    if variant == "attention":
        return a.sum(dim=(1, 2))
    b, h, _, n = probs.shape
    v = expand_kv_heads(values, h).to(acc)  # [B, H, N, d]
    if variant == "value_norm":
        return torch.einsum("bhqn,bhn->bn", a, v.norm(dim=-1))
    # contrib, in the Gram form (docs/method.md, "Gram form"): with U_j^h = v_j^h W_O^h (a D-vector per head),
    # G_j = U_j U_j^T is H x H per key and c_ij^2 = a_ij^T G_j a_ij. Keys are chunked so the U
    # intermediate stays bounded; the Q x N x D tensor of the direct form is never built.
    d = v.shape[-1]
    big_d = o_weight.shape[0]
    w_heads = o_weight.to(acc).t().reshape(h, d, big_d)  # W_O^h: [H, d, D]
    chunk = max(1, _CONTRIB_CHUNK_ELEMENTS // max(1, b * h * big_d))
    scores = []
    for start in range(0, n, chunk):
        v_chunk = v[:, :, start : start + chunk]  # [B, H, n, d]
        u = torch.einsum("bhnd,hdD->bnhD", v_chunk, w_heads)  # [B, n, H, D]
        gram = u @ u.transpose(-1, -2)  # [B, n, H, H]
        a_chunk = a[..., start : start + chunk]  # [B, H, Q, n]
        quad = torch.einsum("bhqn,bnhg,bgqn->bqn", a_chunk, gram, a_chunk)
        scores.append(quad.clamp_min(0).sqrt().sum(dim=1))
    return torch.cat(scores, dim=1)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, ascending; ties go to the lower index.

    Every implementation of CapaContribTopK must return exactly this set.
    """
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, {n}] (the number of visual keys)")
    # A stable descending sort keeps equal scores in index order, so ties favour the lower index.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def contrib_topk(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str = "contrib"
) -> torch.Tensor:
    """The CapaContribTopK op: int32 [B, k] sorted kept indices (reference semantics)."""
    return top_k_indices(contribution_scores(probs, values, o_weight, variant=variant), k).to(torch.int32)


def contribution_scores_dense(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, variant: str = "contrib"
) -> torch.Tensor:
    """The same scores as `contribution_scores`, written with MatMul / Mul / ReduceSum / Sqrt only
    (no loop over key chunks), in fp32: the form lowered to standard ONNX ops by the exporter for
    runtimes without the CapaContribTopK plugin. Its U intermediate is [B, H, N, D]."""
    a = probs.float()
    if variant == "attention":
        return a.sum(dim=(1, 2))
    h = probs.shape[1]
    v = expand_kv_heads(values, h).float()  # [B, H, N, d]
    if variant == "value_norm":
        return (a * torch.sqrt((v * v).sum(-1))[:, :, None, :]).sum(dim=(1, 2))
    d = v.shape[-1]
    w_heads = o_weight.float().t().reshape(h, d, o_weight.shape[0])  # [H, d, D]
    u = (v @ w_heads[None]).transpose(1, 2)  # [B, N, H, D]
    gram = u @ u.transpose(-1, -2)  # [B, N, H, H]
    a_keys = a.permute(0, 3, 2, 1)  # [B, N, Q, H]
    quad = ((a_keys @ gram) * a_keys).sum(-1)  # [B, N, Q]
    return torch.sqrt(torch.clamp(quad, min=0.0)).sum(-1)
