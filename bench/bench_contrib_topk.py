"""Time the CapaContribTopK CUDA op against a PyTorch eager decomposition, at LLaVA-1.5-7B dims.

    python bench/bench_contrib_topk.py [--dtype bf16] [--repeats 50] [--out bench.json]

Eager decomposition: capa_export.method.scoring.contribution_scores (einsum / matmul / norms, the
Gram form chunked over keys), then torch.topk and a sort of the kept indices. Timing: CUDA events
around each call, after warm-up; the median, min, max and 10th/90th percentiles are reported.
Exits with a message (status 2) when no GPU or no CUDA build of capa_export._native is present.
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


def eager(probs, values, o_weight, k, variant):
    from capa_export.method.scoring import contribution_scores

    scores = contribution_scores(probs, values, o_weight, variant=variant)
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 20:
        parser.error("--repeats must be >= 20")

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
    report = {
        "benchmark": "CapaContribTopK CUDA op vs PyTorch eager decomposition",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
