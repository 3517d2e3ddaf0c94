"""CapaContribTopK on every implementation against a float64 brute force (test-backend-ops style).

One table of cases (shapes x variants x dtypes) times one list of implementations. The reference
is written here, independent of capa_export/method/scoring.py: it materialises every v_j^h W_O^h
with explicit per-head matmuls in float64 and takes the direct norm of sum_h a v W_O (no Gram
form), from the same dtype-rounded inputs the implementations see.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from capa_export.method import scoring
from capa_export.ops import native
from tests.adversarial_topk import ADVERSARIAL, stable_topk

import capa_export.ops  # noqa: F401  (registers torch.ops.capa.contrib_topk)

VARIANTS = ("contrib", "value_norm", "attention")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative (to the largest |score|) score tolerance. The reference uses the same rounded inputs,
# so only fp32 accumulation differs; fp16/bf16 keep a little margin for longer sums.
SCORE_RTOL = {"fp32": 1e-4, "fp16": 2e-4, "bf16": 2e-4}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    H_kv: int
    Q: int
    N: int
    d: int
    D: int
    k: int
    ties: bool = False  # keys j and j + N/2 identical (probs and values), so scores tie exactly


SHAPES = [
    Shape("small", B=2, H=4, H_kv=4, Q=3, N=37, d=8, D=16, k=5),
    Shape("k1", B=1, H=2, H_kv=2, Q=2, N=20, d=4, D=8, k=1),
    Shape("k_eq_n", B=2, H=2, H_kv=1, Q=2, N=17, d=4, D=8, k=17),
    Shape("n_not_block_multiple", B=1, H=2, H_kv=2, Q=2, N=1031, d=4, D=8, k=100),
    Shape("n2880", B=1, H=4, H_kv=2, Q=2, N=2880, d=8, D=32, k=64),
    Shape("gqa", B=2, H=8, H_kv=2, Q=5, N=50, d=16, D=32, k=10),
    Shape("d_not_tile_multiple", B=1, H=3, H_kv=1, Q=70, N=9, d=40, D=70, k=4),
    Shape("ties", B=2, H=4, H_kv=2, Q=3, N=24, d=8, D=16, k=7, ties=True),
    # The CUDA column's awkward cases (issue 16): ties across more keys than one top-k block
    # (1,024 threads), N = 8,192, 64 heads (above the contrib kernel's 8-keys-per-block budget),
    # and a batch of 16 rows (one top-k block each).
    Shape("ties_n2048", B=2, H=4, H_kv=2, Q=3, N=2048, d=8, D=16, k=700, ties=True),
    Shape("n8192", B=1, H=2, H_kv=1, Q=2, N=8192, d=4, D=8, k=64),
    Shape("h64", B=1, H=64, H_kv=8, Q=4, N=40, d=4, D=32, k=8),
    Shape("b16", B=16, H=4, H_kv=4, Q=3, N=100, d=8, D=16, k=10),
    # Head sizes the Gram-form candidate runs (d in {16, ..., 256}): N not a multiple of its 64-key
    # tile, H not a multiple of its 256 / d heads per block, GQA, ties.
    Shape("d64_n300", B=1, H=8, H_kv=8, Q=6, N=300, d=64, D=512, k=40),
    Shape("d128_gqa", B=2, H=3, H_kv=1, Q=5, N=130, d=128, D=384, k=20),
    Shape("ties_d16", B=1, H=4, H_kv=2, Q=3, N=200, d=16, D=64, k=50, ties=True),
]


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_distinct = shape.N // 2 if shape.ties else shape.N
    logits = torch.randn(shape.B, shape.H, shape.Q, n_distinct, generator=gen, dtype=torch.float64) * 2
    probs = torch.softmax(logits, dim=-1)
    values = torch.randn(shape.B, shape.H_kv, n_distinct, shape.d, generator=gen, dtype=torch.float64)
    # Value norms spread over a decade so contribution and attention rankings differ.
    values = values * torch.exp(torch.randn(shape.B, shape.H_kv, n_distinct, 1, generator=gen, dtype=torch.float64))
    if shape.ties:
        probs = torch.cat([probs, probs], dim=-1)
        values = torch.cat([values, values], dim=2)
    o_weight = torch.randn(shape.D, shape.H * shape.d, generator=gen, dtype=torch.float64) / shape.d**0.5
    return probs.to(dtype), values.to(dtype), o_weight.to(dtype)


def brute_force_scores(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, variant: str) -> torch.Tensor:
    a, v, w = probs.double(), values.double(), o_weight.double()
    b, h, q, n = a.shape
    h_kv, d = v.shape[1], v.shape[3]
    group = h // h_kv
    v_per_head = torch.stack([v[:, head // group] for head in range(h)], dim=1)  # [B, H, N, d]
    if variant == "attention":
        return a.sum(dim=(1, 2))
    if variant == "value_norm":
        norms = torch.sqrt((v_per_head**2).sum(dim=-1))  # [B, H, N]
        return (a * norms[:, :, None, :]).sum(dim=(1, 2))
    # U[b, n, h, :] = v_j^h W_O^h, with W_O^h = o_weight[:, h*d:(h+1)*d]^T (d x D)
    u = torch.stack([v_per_head[:, head] @ w[:, head * d : (head + 1) * d].T for head in range(h)], dim=2)
    y = torch.einsum("bhqn,bnhD->bqnD", a, u)  # sum_h a_ij^h v_j^h W_O^h, per query and key
    return torch.sqrt((y**2).sum(dim=-1)).sum(dim=1)


def float64_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


# ---- implementations: each returns (int32 indices [B, k], fp32 scores [B, N] or None) ------------


def run_python(p, v, w, k, variant):
    return scoring.contrib_topk(p, v, w, k, variant), scoring.contribution_scores(p, v, w, variant=variant)


def run_native_cpu(p, v, w, k, variant):
    if not native.available():
        pytest.skip(native.unavailable_reason())
    ext = native.module()
    code = native.variant_code(variant)
    return torch.from_numpy(ext.contrib_topk_cpu(p, v, w, k, code)), torch.from_numpy(
        ext.contribution_scores_cpu(p, v, w, code)
    )


def run_torch_op_cpu(p, v, w, k, variant):
    return torch.ops.capa.contrib_topk(p, v, w, k, variant), None


def run_onnx_function(p, v, w, k, variant):
    """The CapaContribTopK node with its ONNX local function, run by ONNX Runtime (fp32 and fp16 graphs)."""
    if p.dtype == torch.bfloat16:
        pytest.skip("ONNX Runtime has no bfloat16 CPU kernels (MatMul, Mul, ReduceSum)")
    import onnxruntime as ort
    from onnx import TensorProto

    from capa_export.ops.onnx_function import single_op_model

    onnx_type, numpy_type = {torch.float32: (TensorProto.FLOAT, np.float32),
                             torch.float16: (TensorProto.FLOAT16, np.float16)}[p.dtype]
    session = ort.InferenceSession(single_op_model(k, variant, onnx_type).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = {"probs": p.float().numpy().astype(numpy_type), "values": v.float().numpy().astype(numpy_type),
            "o_weight": w.float().numpy().astype(numpy_type)}
    (keep,) = session.run(None, feed)
    return torch.from_numpy(keep), None


def run_cuda(p, v, w, k, variant):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available (torch.cuda.is_available() is False)")
    if not native.cuda_compiled():
        pytest.skip(f"capa_export._native has no CUDA kernels: {native.unavailable_reason() or 'built without nvcc'}")
    keep = torch.ops.capa.contrib_topk(p.cuda(), v.cuda(), w.cuda(), k, variant)
    torch.cuda.synchronize()
    return keep.cpu(), None


def run_cuda_gram(p, v, w, k, variant):
    """The Gram-form candidate kernels (scores only); keep = a float64 stable top-k of its scores, so
    tied keys must get bit-equal scores for the tie check to pass."""
    if variant != "contrib" or p.dtype == torch.float32:
        pytest.skip("the Gram-form candidate runs the contrib variant in fp16/bf16 only")
    if v.shape[-1] % 16 or 256 % v.shape[-1] or p.shape[1] > 83:
        pytest.skip("the Gram-form candidate needs d in {16, 32, 64, 128, 256} and H <= 83")
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available (torch.cuda.is_available() is False)")
    if not native.cuda_compiled():
        pytest.skip(f"capa_export._native has no CUDA kernels: {native.unavailable_reason() or 'built without nvcc'}")
    from capa_export.ops.torch_op import contribution_scores_gram_cuda

    scores = contribution_scores_gram_cuda(p.cuda(), v.cuda(), w.cuda()).cpu()
    return float64_topk(scores.double(), k).to(torch.int32), scores


def run_tensorrt(p, v, w, k, variant):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt not installed")
    from tests.test_trt_plugin_build import run_plugin_engine  # noqa: PLC0415  (needs tensorrt)

    return torch.from_numpy(run_plugin_engine(p, v, w, k, variant)), None


IMPLEMENTATIONS = {
    "python": run_python,
    "native_cpu": run_native_cpu,
    "torch_op_cpu": run_torch_op_cpu,
    "onnxruntime": run_onnx_function,
    "cuda": run_cuda,
    "cuda_gram": run_cuda_gram,
    "tensorrt": run_tensorrt,
}

CASES = [
    pytest.param(shape, variant, dtype_name, id=f"{shape.name}-{variant}-{dtype_name}")
    for shape in SHAPES
    for variant in VARIANTS
    for dtype_name in DTYPES
]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape,variant,dtype_name", CASES)
def test_contrib_topk(shape: Shape, variant: str, dtype_name: str, impl: str) -> None:
    probs, values, o_weight = make_inputs(shape, DTYPES[dtype_name])
    ref_scores = brute_force_scores(probs, values, o_weight, variant)
    tol = SCORE_RTOL[dtype_name] * float(ref_scores.abs().max()) + 1e-12

    keep, scores = IMPLEMENTATIONS[impl](probs, values, o_weight, shape.k, variant)

    assert keep.dtype == torch.int32 and tuple(keep.shape) == (shape.B, shape.k)
    keep64 = keep.long()
    assert bool((keep64[:, 1:] > keep64[:, :-1]).all()), "indices must be strictly ascending"
    assert int(keep64.min()) >= 0 and int(keep64.max()) < shape.N
    if scores is not None:
        assert tuple(scores.shape) == (shape.B, shape.N)
        err = float((scores.double() - ref_scores).abs().max())
        assert err <= tol, f"scores differ from the float64 reference by {err:.3g} > {tol:.3g}"

    ref_sorted = torch.sort(ref_scores, dim=-1, descending=True).values
    expected = float64_topk(ref_scores, shape.k)
    for b in range(shape.B):
        # The kept scores must be the k largest, whatever the tie-break among near-equal ones.
        kept_sorted = torch.sort(ref_scores[b, keep64[b]], descending=True).values
        assert float((kept_sorted - ref_sorted[b, : shape.k]).abs().max()) <= tol
        gap = float(ref_sorted[b, shape.k - 1] - ref_sorted[b, shape.k]) if shape.k < shape.N else float("inf")
        if gap > tol:
            assert keep64[b].tolist() == expected[b].tolist()
    if shape.ties:
        # Identical keys j and j + N/2: when exactly one of a pair is kept, it is the lower index.
        half = shape.N // 2
        for b in range(shape.B):
            kept = set(keep64[b].tolist())
            for j in range(half):
                if (j in kept) != (j + half in kept):
                    assert j in kept, f"tie between keys {j} and {j + half} must keep {j}"


# ---- the Gram-form candidate's blocking, emulated in float64 -----------------------------------
# The CUDA kernels cannot run here; this emulation walks the same grid (64-key tiles x head g x
# slices of 256 / d heads), skips the same blocks (every head below g), reads the same blocks of
# M = o_weight^T o_weight and mirrors G_j[h,g] to G_j[g,h] as gram_form_kernel does, so an indexing
# or coverage mistake in that plan fails here against the direct brute force.


def gram_form_emulation(probs, values, o_weight, tile_keys=64, cols=256):
    a, v, w = probs.double(), values.double(), o_weight.double()
    b_, h_, q_, n_ = a.shape
    h_kv, d = v.shape[1], v.shape[3]
    group = h_ // h_kv
    m = w.T @ w  # what output_gram computes (in the inputs' dtype on the GPU)
    per_block = cols // d
    slices = -(-h_ // per_block)
    gram = torch.full((b_, n_, h_, h_), float("nan"), dtype=torch.float64)
    for z in range(b_ * slices):
        b, h0 = z // slices, (z % slices) * per_block
        for g in range(h_):
            if h0 + per_block - 1 < g:
                continue
            for j0 in range(0, n_, tile_keys):
                keys = slice(j0, min(j0 + tile_keys, n_))
                z_tile = v[b, g // group, keys] @ m[g * d:(g + 1) * d, h0 * d:min((h0 + per_block) * d, h_ * d)]
                for h in range(max(h0, g), min(h0 + per_block, h_)):
                    dots = (z_tile[:, (h - h0) * d:(h - h0 + 1) * d] * v[b, h // group, keys]).sum(-1)
                    gram[b, keys, h, g] = dots
                    gram[b, keys, g, h] = dots
    assert not bool(gram.isnan().any()), "some G_j[h,g] was never written"
    quad = torch.einsum("bhqn,bnhg,bgqn->bqn", a, gram, a)
    return quad.clamp_min(0).sqrt().sum(dim=1)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.d % 16 == 0 and 256 % s.d == 0], ids=lambda s: s.name)
def test_gram_form_blocking_equals_brute_force(shape: Shape) -> None:
    probs, values, o_weight = make_inputs(shape, torch.float64)
    expected = brute_force_scores(probs, values, o_weight, "contrib")
    got = gram_form_emulation(probs, values, o_weight)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_output_gram_refuses_an_fp16_overflow() -> None:
    """A column of o_weight with a norm above 256 overflows fp16 in M: refused, not every score inf."""
    from capa_export.ops.torch_op import output_gram

    o_weight = torch.full((8, 4), 0.01, dtype=torch.float16)
    assert bool(torch.isfinite(output_gram(o_weight)).all())
    o_weight[:, 1] = 100.0  # column norm 283
    with pytest.raises(ValueError, match="does not fit torch.float16"):
        output_gram(o_weight)
    assert bool(torch.isfinite(output_gram(o_weight.to(torch.bfloat16))).all())


def test_output_gram_blocks() -> None:
    """output_gram's (h, g) block is W_O^h W_O^g^T, the matrix gram_form_kernel reads."""
    from capa_export.ops.torch_op import output_gram

    _, _, o_weight = make_inputs(Shape("m", B=1, H=3, H_kv=3, Q=1, N=2, d=4, D=10, k=1), torch.float64)
    m = output_gram(o_weight)
    w_o = [o_weight[:, h * 4:(h + 1) * 4].T for h in range(3)]  # W_O^h: d x D
    for h in range(3):
        for g in range(3):
            torch.testing.assert_close(m[h * 4:(h + 1) * 4, g * 4:(g + 1) * 4], w_o[h] @ w_o[g].T)


# ---- adversarial top-k: ties, N not a multiple of the block, N > 8192, +-0, +-inf, NaN ----------
# The attention variant with H = Q = 1 makes the score of key j exactly probs[b, 0, 0, j], so each
# implementation's top-k runs on the chosen scores; the reference is Python's stable sort
# (tests/adversarial_topk.py): NaN above +inf, NaNs tie, -0 == +0, ties to the lower index.

ADVERSARIAL_IMPLEMENTATIONS = ["python", "native_cpu", "torch_op_cpu", "onnxruntime", "cuda", "tensorrt"]


@pytest.mark.parametrize("impl", ADVERSARIAL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_topk_adversarial(case: str, impl: str) -> None:
    scores, k = ADVERSARIAL[case]
    b, n = scores.shape
    probs = torch.from_numpy(scores.copy()).reshape(b, 1, 1, n)
    values = torch.ones(b, 1, n, 1)
    o_weight = torch.ones(1, 1)
    keep, _ = IMPLEMENTATIONS[impl](probs, values, o_weight, k, "attention")
    assert keep.dtype == torch.int32 and tuple(keep.shape) == (b, k)
    np.testing.assert_array_equal(keep.numpy().astype(np.int64), stable_topk(scores, k))


@pytest.mark.parametrize("impl", ["python", "native_cpu", "torch_op_cpu", "cuda"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch_gives_empty_result(impl: str, variant: str) -> None:
    # B = 0 (an empty batch of a dynamic-shape engine) is a no-op, not an error.
    probs, values, o_weight = make_inputs(Shape("empty", B=1, H=4, H_kv=2, Q=3, N=10, d=4, D=8, k=3), torch.float32)
    keep, _ = IMPLEMENTATIONS[impl](probs[:0], values[:0], o_weight, 3, variant)
    assert keep.dtype == torch.int32 and tuple(keep.shape) == (0, 3)


# ---- non-finite inputs: NaN and inf in probs/values rank as the reference's scores do ------------
# A NaN in key 3's values (contrib, value_norm) or probs (attention) makes its score NaN, which ranks
# above everything; +inf in key 7's probs makes the value_norm/attention score +inf (not contrib:
# its quadratic form turns inf into NaN or inf depending on the Gram matrix's signs).


@pytest.mark.parametrize("impl", ["python", "native_cpu", "torch_op_cpu", "onnxruntime", "cuda", "tensorrt"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_inputs(variant: str, impl: str) -> None:
    shape = Shape("nonfinite", B=2, H=4, H_kv=2, Q=3, N=30, d=8, D=16, k=6)
    probs, values, o_weight = make_inputs(shape, torch.float32, seed=3)
    if variant == "attention":
        probs[:, 1, 2, 3] = float("nan")
    else:
        values[:, 0, 3, 5] = float("nan")
    if variant != "contrib":
        probs[1, 2, 0, 7] = float("inf")
    ref_scores = brute_force_scores(probs, values, o_weight, variant)
    assert bool(ref_scores[:, 3].isnan().all())
    keep, _ = IMPLEMENTATIONS[impl](probs, values, o_weight, shape.k, variant)
    np.testing.assert_array_equal(keep.numpy().astype(np.int64), stable_topk(ref_scores.float().numpy(), shape.k))


def test_heads_above_the_cuda_limit_are_refused_before_launch() -> None:
    """contrib with more heads than the kernel's shared memory holds: a ValueError naming H and the
    device's limit (capa_contrib_topk_check_device, what TensorRT's configurePlugin calls)."""
    if not torch.cuda.is_available() or not native.cuda_compiled():
        pytest.skip("needs a CUDA GPU and a CUDA build of capa_export._native")
    props = torch.cuda.get_device_properties(0)
    limit = native.module().contrib_max_heads(int(props.shared_memory_per_block_optin))
    assert limit >= 64, f"the contrib kernel supports only {limit} heads on {props.name}"
    probs, values, o_weight = make_inputs(Shape("too_many_heads", B=1, H=limit + 1, H_kv=1, Q=2, N=9, d=2, D=4, k=3),
                                          torch.float32)
    with pytest.raises(ValueError, match=rf"H <= {limit}"):
        torch.ops.capa.contrib_topk(probs.cuda(), values.cuda(), o_weight.cuda(), 3, "contrib")


# ---- bad inputs: every implementation raises ValueError naming the argument --------------------


def _good(dtype=torch.float32):
    return make_inputs(Shape("bad", B=2, H=4, H_kv=2, Q=3, N=10, d=4, D=8, k=3), dtype)


def _bad_cases():
    p, v, w = _good()
    return [
        ("probs_rank", (p[0], v, w, 3, "contrib"), "probs"),
        ("values_rank", (p, v[0], w, 3, "contrib"), "values"),
        ("o_weight_rank", (p, v, w[None], 3, "contrib"), "o_weight"),
        ("batch_mismatch", (p, v[:1], w, 3, "contrib"), "batch"),
        ("n_mismatch", (p, v[:, :, :9], w, 3, "contrib"), "keys|N"),
        ("heads_not_multiple", (p[:, :3], v[:, :2], w[:, :12], 3, "contrib"), "H_kv"),
        ("o_weight_columns", (p, v, w[:, :15], 3, "contrib"), "o_weight"),
        ("k_above_n", (p, v, w, 11, "contrib"), "k="),
        ("k_zero", (p, v, w, 0, "contrib"), "k="),
        ("k_negative", (p, v, w, -2, "contrib"), "k="),
        ("unknown_variant", (p, v, w, 3, "fastv"), "variant"),
        ("mixed_dtypes", (p, v.half(), w, 3, "contrib"), "dtype"),
    ]


def _call_python(args):
    return scoring.contrib_topk(*args)


def _call_torch_op(args):
    return torch.ops.capa.contrib_topk(*args)


def _call_native(args):
    if not native.available():
        pytest.skip(native.unavailable_reason())
    p, v, w, k, variant = args
    return native.module().contrib_topk_cpu(p, v, w, k, variant)


BAD_CALLERS = {"python": _call_python, "torch_op": _call_torch_op, "native_cpu": _call_native}


@pytest.mark.parametrize("caller", list(BAD_CALLERS))
@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error(case: int, caller: str) -> None:
    name, args, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        BAD_CALLERS[caller](args)


def test_fake_tensor_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p, v, w = (torch.empty(2, 4, 3, 10), torch.empty(2, 2, 10, 4), torch.empty(8, 16))
        out = torch.ops.capa.contrib_topk(p, v, w, 5, "contrib")
    assert tuple(out.shape) == (2, 5) and out.dtype == torch.int32


def test_function_through_polygraphy_reference_evaluator_and_inliner() -> None:
    """The op's ONNX local function: passes the full checker, runs through Polygraphy's ONNX Runtime
    runner, onnx's ReferenceEvaluator, and inlined, each equal to the Python reference."""
    import onnx
    import onnx.inliner
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from capa_export.ops.onnx_function import single_op_model

    p, v, w = _good()
    feed = {"probs": p.numpy(), "values": v.numpy(), "o_weight": w.numpy()}
    expected = scoring.contrib_topk(p, v, w, 3).numpy()
    model = single_op_model(3, "contrib")
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with OnnxrtRunner(session) as runner:
        np.testing.assert_array_equal(runner.infer(feed)["keep_indices"], expected)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, feed)[0], expected)
    inlined = onnx.inliner.inline_local_functions(model)
    assert not inlined.functions and "TopK" in {n.op_type for n in inlined.graph.node}
    np.testing.assert_array_equal(
        ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0], expected)
