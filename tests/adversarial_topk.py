"""Adversarial score rows for CapaContribTopK's top-k, and an independent reference.

Shared by tests/test_contrib_topk_op.py (every implementation) and tests/test_topk_emulation.py
(the CUDA kernel's algorithm emulated on the host). The reference is Python's own stable `sorted`
with an explicit key, not torch.sort: NaN (either sign, any payload) ranks above +inf and all NaNs
tie, -0.0 ties with +0.0, and equal scores keep the lower index.
"""

from __future__ import annotations

import math

import numpy as np


def _floats_from_bits(bits: list[int]) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _rows() -> dict[str, tuple[np.ndarray, int]]:
    """name -> (float32 [B, N] scores, k)."""
    rng = np.random.default_rng(1234)
    cases: dict[str, tuple[np.ndarray, int]] = {}
    cases["all_equal"] = (np.full((1, 3000), 0.25, np.float32), 1000)
    cases["ties_many_duplicates"] = (rng.integers(0, 7, size=(2, 2500)).astype(np.float32), 1234)
    cases["n_not_block_multiple_1025"] = (rng.standard_normal((1, 1025)).astype(np.float32), 513)
    cases["n_not_block_multiple_2047"] = (rng.integers(-3, 3, size=(1, 2047)).astype(np.float32), 1024)
    cases["n_above_8192_ties"] = (rng.integers(0, 50, size=(1, 10000)).astype(np.float32), 4097)
    cases["n_above_8192_k1"] = (rng.standard_normal((1, 9000)).astype(np.float32), 1)
    zeros = np.where(rng.random((1, 600)) < 0.5, -0.0, 0.0).astype(np.float32)
    zeros[0, ::7] = -1.0
    cases["signed_zeros"] = (zeros, 300)
    inf_row = rng.standard_normal((1, 700)).astype(np.float32)
    inf_row[0, ::5] = np.inf
    inf_row[0, 1::5] = -np.inf
    cases["infinities"] = (inf_row, 200)
    # Quiet/signalling, positive/negative NaNs with different payloads among ordinary numbers and inf.
    nan_bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF]
    nan_row = rng.standard_normal((1, 1500)).astype(np.float32)
    positions = rng.choice(1500, size=60, replace=False)
    nan_row[0, positions] = _floats_from_bits([nan_bits[i % len(nan_bits)] for i in range(60)])
    nan_row[0, rng.choice(1500, size=20, replace=False)] = np.inf
    cases["nans_boundary_inside"] = (nan_row, 45)  # k cuts through the NaNs
    cases["nans_then_infinities"] = (nan_row.copy(), 70)  # all NaNs, then some of the infs
    cases["all_nan"] = (_floats_from_bits([nan_bits[i % len(nan_bits)] for i in range(1100)])[None, :].copy(), 37)
    # Keys that differ only in the low bytes: every radix pass decides.
    base = np.float32(1.0).view(np.uint32)
    low = (base + rng.integers(0, 1 << 16, size=(1, 4000)).astype(np.uint32)).view(np.float32)
    cases["low_byte_differences"] = (low.astype(np.float32), 1999)
    subnormal = _floats_from_bits(list(rng.integers(1, 1 << 20, size=900)) + [0x80000001] * 100)[None, :].copy()
    cases["subnormals"] = (subnormal, 450)
    cases["negatives_only"] = ((-rng.random((1, 1300)) - 1).astype(np.float32), 650)
    cases["k_equals_n"] = (rng.standard_normal((2, 1030)).astype(np.float32), 1030)
    mixed = np.stack([
        rng.integers(0, 3, size=1200).astype(np.float32),
        np.full(1200, np.nan, np.float32),
        rng.standard_normal(1200).astype(np.float32),
    ])
    cases["batch_of_three_mixed"] = (mixed, 600)
    return cases


ADVERSARIAL = _rows()


def _rank_key(x: float) -> tuple[int, float]:
    if math.isnan(x):
        return (0, 0.0)
    return (1, -x)  # -(-0.0) == -(0.0): the two zeros tie


def stable_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 [B, k]: the k best indices of each row by Python's stable sort, ascending."""
    out = []
    for row in np.asarray(scores, dtype=np.float32):
        values = [float(v) for v in row]
        order = sorted(range(len(values)), key=lambda j: _rank_key(values[j]))
        out.append(sorted(order[:k]))
    return np.asarray(out, dtype=np.int64)
