"""Time the CapaContribTopK op against a PyTorch eager decomposition.

    python bench/bench_contrib_topk.py [--dtype bf16] [--repeats 50] [--out bench.json]        # CUDA
    python bench/bench_contrib_topk.py --device cpu [--repeats 20] [--out bench/results/op-cpu.json]

Eager decomposition: capa_export.method.scoring.contribution_scores (einsum / matmul / norms, the
Gram form chunked over keys), then torch.topk and a sort of the kept indices.
CUDA (LLaVA-1.5-7B dims, N = 576 and 2880): the op's kernels, timed with CUDA events; exits with a
message (status 2) when no GPU or no CUDA build of capa_export._native is present.
CPU (fp32; the benchmark's mid size and LLaVA-1.5-7B dims, N = 576): `torch.ops.capa.contrib_topk`
(what the CapaModel, `generate` and validation run), the op's ONNX local function run by ONNX
Runtime (what an engine runs), and the C++ scalar reference (the correctness reference of the
CUDA kernels, not used on any fast path), each against the eager decomposition in the same run.
Medians and 10th/90th percentiles after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# LLaVA-1.5-7B language model: 32 heads of 128, hidden 4096; ~40 instruction queries score 576
# (LLaVA-1.5) or 2880 (LLaVA-NeXT) visual keys; k = 64 kept.
CONFIGS = [dict(B=1, H=32, H_kv=32, d=128, D=4096, Q=40, N=n, k=64) for n in (576, 2880)]
# CPU: the mid size of `capa-export bench` (16 heads of 64, hidden 1024) and LLaVA-1.5-7B, 576 keys
# scored by the ~45 text queries of a short question
CPU_CONFIGS = [dict(name="mid", B=1, H=16, H_kv=16, d=64, D=1024, Q=45, N=576, k=64),
               dict(name="llava-1.5-7b", B=1, H=32, H_kv=32, d=128, D=4096, Q=45, N=576, k=64)]


def eager(probs, values, o_weight, k, variant):
    from capa_export.method.scoring import contribution_scores

    scores = contribution_scores(probs, values, o_weight, variant=variant)
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    if args.device == "cpu":
        return write_report(time_cpu(args), args.out)
    args.dtype = args.dtype or "bf16"

    if not torch.cuda.is_available():
        print("bench_contrib_topk: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); nothing to time", file=sys.stderr)
        return 2
    from capa_export.ops import native

    if not native.cuda_compiled():
        print(f"bench_contrib_topk: capa_export._native has no CUDA kernels ({native.unavailable_reason() or 'built without nvcc'})", file=sys.stderr)
        return 2
    import capa_export.ops  # noqa: F401  (registers torch.ops.capa.contrib_topk)

    from capa_export.bench import Timer

    time_cuda = Timer("cuda", args.warmup, args.repeats)  # CUDA events, median and 10th/90th percentiles
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for cfg in CONFIGS:
        b, h, h_kv, d, big_d, q, n, k = (cfg[x] for x in ("B", "H", "H_kv", "d", "D", "Q", "N", "k"))
        probs = torch.softmax(torch.randn(b, h, q, n, device="cuda", generator=gen), dim=-1).to(dtype)
        values = torch.randn(b, h_kv, n, d, device="cuda", generator=gen).to(dtype)
        o_weight = (torch.randn(big_d, h * d, device="cuda", generator=gen) / (h * d) ** 0.5).to(dtype)
        for variant in ("contrib", "value_norm", "attention"):
            op = lambda: torch.ops.capa.contrib_topk(probs, values, o_weight, k, variant)  # noqa: E731
            ref = lambda: eager(probs, values, o_weight, k, variant)  # noqa: E731
            kept_op, kept_ref = op().long(), ref().long()
            overlap = sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(kept_op, kept_ref)) / (b * k)
            row = {
                **cfg,
                "variant": variant,
                "dtype": args.dtype,
                "capa_cuda": time_cuda(op),
                "torch_eager": time_cuda(ref),
                "kept_overlap_with_eager": overlap,
            }
            row["speedup"] = row["torch_eager"]["median_ms"] / row["capa_cuda"]["median_ms"]
            results.append(row)
            print(f"N={n:5d} {variant:10s} capa {row['capa_cuda']['median_ms']:.3f} ms  eager "
                  f"{row['torch_eager']['median_ms']:.3f} ms  x{row['speedup']:.2f}  overlap {overlap:.3f}", file=sys.stderr)
    return write_report({
        "benchmark": "CapaContribTopK CUDA op vs PyTorch eager decomposition",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }, args.out)


def write_report(report: dict, out: str | None) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


def time_cpu(args) -> dict:
    import os
    import platform

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto

    import capa_export.ops  # noqa: F401  (registers torch.ops.capa.contrib_topk)
    from capa_export.bench import Timer
    from capa_export.ops import native
    from capa_export.ops.onnx_function import single_op_model

    dtype = args.dtype or "fp32"
    if dtype != "fp32":
        raise SystemExit("bench_contrib_topk: the CPU comparison is fp32 (ONNX Runtime has no bf16 CPU kernels)")
    timer = Timer("cpu", args.warmup, args.repeats)
    gen = torch.Generator().manual_seed(0)
    results = []
    for cfg in CPU_CONFIGS:
        b, h, h_kv, d, big_d, q, n, k = (cfg[x] for x in ("B", "H", "H_kv", "d", "D", "Q", "N", "k"))
        probs = torch.softmax(torch.randn(b, h, q, n, generator=gen), dim=-1)
        values = torch.randn(b, h_kv, n, d, generator=gen)
        o_weight = torch.randn(big_d, h * d, generator=gen) / (h * d) ** 0.5
        variant = "contrib"
        session = ort.InferenceSession(single_op_model(k, variant, TensorProto.FLOAT).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        feed = {"probs": probs.numpy(), "values": values.numpy(), "o_weight": o_weight.numpy()}
        peers = {
            "torch_eager": lambda: eager(probs, values, o_weight, k, variant),
            "capa_torch_op": lambda: torch.ops.capa.contrib_topk(probs, values, o_weight, k, variant),
            "onnx_function_ort": lambda: session.run(None, feed)[0],
        }
        if native.available():
            ext, code = native.module(), native.variant_code(variant)
            peers["cpp_scalar_reference"] = lambda: ext.contrib_topk_cpu(probs, values, o_weight, k, code)
        reference = eager(probs, values, o_weight, k, variant).numpy()
        row = {**cfg, "variant": variant, "dtype": dtype}
        for name, fn in peers.items():
            kept = np.asarray(fn())
            row[name] = {**timer(fn), "kept_equals_eager": bool((kept.astype(np.int64) == reference).all())}
        for name in peers:
            row[name]["ratio_to_eager"] = row[name]["median_ms"] / row["torch_eager"]["median_ms"]
        results.append(row)
        print(f"{cfg['name']:>12}: " + ", ".join(f"{name} {row[name]['median_ms']:.1f} ms" for name in peers),
              file=sys.stderr)
    return {
        "benchmark": "CapaContribTopK on CPU vs PyTorch eager decomposition (fp32)",
        "device": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
