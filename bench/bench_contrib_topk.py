"""Time the CapaContribTopK op against a PyTorch eager decomposition.

    python bench/bench_contrib_topk.py [--dtype bf16] [--repeats 50] [--out bench.json]        # CUDA
    python bench/bench_contrib_topk.py --device cpu [--repeats 20] [--out bench/results/op-cpu.json]

Eager decomposition: capa_export.method.scoring.contribution_scores (einsum / matmul / norms, the
Gram form chunked over keys), then torch.topk and a sort of the kept indices.
CUDA (LLaVA-1.5-7B dims, N = 576 and 2880): the op's kernels, timed with CUDA events per call and,
without host overhead, as 20 calls in one CUDA graph; the Gram-form tensor-core candidate's scores;
the floors measured in the same run (this GPU's GEMM rate and device copy rate) and issue 16's
targets. Exits with a message (status 2) when no GPU or no CUDA build of capa_export._native is present.
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
    from capa_export.ops.torch_op import contribution_scores_gram_cuda, output_gram

    time_cuda = Timer("cuda", args.warmup, args.repeats)  # CUDA events around each call, host overhead included
    dtype = DTYPES[args.dtype]
    floors = {"gemm_tflops": gemm_tflops(dtype), "copy_gbps": copy_gbps()}
    print(f"floors measured in this run: {args.dtype} GEMM {floors['gemm_tflops']:.0f} TFLOP/s, "
          f"device copy {floors['copy_gbps']:.0f} GB/s (read + write)", file=sys.stderr)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for cfg in CONFIGS:
        b, h, h_kv, d, big_d, q, n, k = (cfg[x] for x in ("B", "H", "H_kv", "d", "D", "Q", "N", "k"))
        probs = torch.softmax(torch.randn(b, h, q, n, device="cuda", generator=gen), dim=-1).to(dtype)
        values = torch.randn(b, h_kv, n, d, device="cuda", generator=gen).to(dtype)
        o_weight = (torch.randn(big_d, h * d, device="cuda", generator=gen) / (h * d) ** 0.5).to(dtype)
        o_gram = output_gram(o_weight)  # per layer, once: not timed
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
                "capa_cuda_device": graph_time(op, args.warmup, args.repeats),
                "torch_eager_device": graph_time(ref, args.warmup, args.repeats),
                "kept_overlap_with_eager": overlap,
                "target_us": (50 if n <= 576 else 250) if variant == "contrib" else 15,
            }
            row["speedup"] = row["torch_eager"]["median_ms"] / row["capa_cuda"]["median_ms"]
            if variant == "contrib":
                macs = b * n * (h * d * big_d + h * h * big_d) + b * q * n * h * h
                row["floor_us"] = 2 * macs / (floors["gemm_tflops"] * 1e12) * 1e6
                # The candidate: scores in the Gram form (tensor cores), then torch.topk for the kept set.
                ref_scores = contribution_scores_eager(probs, values, o_weight)
                gram = lambda: contribution_scores_gram_cuda(probs, values, o_weight, o_gram)  # noqa: E731
                try:
                    scores = gram()
                    kept_gram = torch.topk(scores, k, dim=-1).indices
                    row["gram_form_candidate"] = {
                        "scores": graph_time(gram, args.warmup, args.repeats),
                        "max_score_error_rel": float((scores - ref_scores).abs().max() / ref_scores.abs().max()),
                        "kept_overlap_with_eager": sum(len(set(a.tolist()) & set(r.tolist()))
                                                       for a, r in zip(kept_gram, kept_ref)) / (b * k),
                        "floor_us": 2 * (b * n * h * (h + 1) // 2 * d * d + b * q * n * h * h)
                                    / (floors["gemm_tflops"] * 1e12) * 1e6,
                    }
                except (ValueError, RuntimeError) as exc:  # recorded, not fatal: it is a candidate
                    row["gram_form_candidate"] = {"error": f"{type(exc).__name__}: {exc}"}
            else:
                read = probs.numel() * probs.element_size() + (values.numel() * values.element_size()
                                                               if variant == "value_norm" else 0)
                row["floor_us"] = read / (floors["copy_gbps"] * 1e9 / 2) * 1e6  # a copy reads half its bytes
            row["meets_target"] = row["capa_cuda_device"].get("median_us", float("inf")) <= row["target_us"]
            results.append(row)
            print(f"N={n:5d} {variant:10s} capa {row['capa_cuda']['median_ms']:.3f} ms "
                  f"(device {row['capa_cuda_device'].get('median_us', float('nan')):.1f} us, floor {row['floor_us']:.1f} us, "
                  f"target {row['target_us']} us)  eager {row['torch_eager']['median_ms']:.3f} ms  "
                  f"x{row['speedup']:.2f}  overlap {overlap:.3f}", file=sys.stderr)
            if "gram_form_candidate" in row:
                print(f"             gram-form candidate: {json.dumps(row['gram_form_candidate'])}", file=sys.stderr)
    return write_report({
        "benchmark": "CapaContribTopK CUDA op vs PyTorch eager decomposition",
        "device": torch.cuda.get_device_name(),
        "driver": _nvidia_smi("driver_version"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "floors": floors,
        "timing": "capa_cuda / torch_eager: CUDA events around each call (host overhead included); *_device: "
                  "20 calls captured in one CUDA graph, replayed between CUDA events, per call (device time)",
        "results": results,
    }, args.out)


def contribution_scores_eager(probs, values, o_weight):
    from capa_export.method.scoring import contribution_scores

    return contribution_scores(probs, values, o_weight, variant="contrib").float()


def graph_time(fn, warmup: int, repeats: int, inner: int = 20) -> dict:
    """Device time per call in microseconds: `inner` calls captured in one CUDA graph, replayed
    `repeats` times between CUDA events (no host overhead). {"error": ...} when fn cannot be captured."""
    import statistics

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 2)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception as exc:  # noqa: BLE001  (a peer that syncs or allocates on the host cannot be captured)
        return {"error": f"not capturable in a CUDA graph: {type(exc).__name__}: {exc}"}
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_us": statistics.median(times), "p10_us": pick(0.1), "p90_us": pick(0.9), "runs": len(times),
            "calls_per_graph": inner}


def gemm_tflops(dtype: torch.dtype, size: int = 8192) -> float:
    """The GEMM rate of this GPU in this run (the contrib floor's denominator): median of 10."""
    a = torch.randn(size, size, device="cuda").to(dtype)
    timed = graph_time(lambda: a @ a, 3, 10, inner=5)
    return 2 * size**3 / (timed["median_us"] * 1e-6) / 1e12


def copy_gbps(size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in this run (read + write bytes per second / 1e9): median of 10."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timed = graph_time(lambda: dst.copy_(src), 3, 10, inner=5)
    return 2 * size_bytes / (timed["median_us"] * 1e-6) / 1e9


def _nvidia_smi(field: str) -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


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
