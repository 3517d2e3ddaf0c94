"""`capa-export bench`: prefill / decode timings of CAPA against its peers, in one run, on one device.

Peers, same inputs, same run: HF transformers SDPA unpruned; FastV-style pruning in eager PyTorch
(the `attention` variant); the CapaModel eager; the CapaModel under torch.compile; the ONNX
Runtime engine (prefill graph). Scenarios: keep k after K=2, with and without FFN approximation
(affine, rank r). Real-size configs use random weights (timing does not depend on their values);
their FFN maps are random matrices of the right shapes ("timing-only"), never used for accuracy.

Timing: CUDA events on a GPU (perf_counter on CPU) after warm-up; medians and the 10th/90th
percentiles of `repeats` runs. Floors measured in the same run: the matmul peak (a large matmul in
the benchmark dtype) and the copy bandwidth (a large device copy); compute floor = FLOPs / peak,
weight floor = weight bytes read once / bandwidth. Results: JSON (+ a PNG of latency vs kept tokens).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .artifacts import write_json
from .method.ffn import FfnApproximation, LayerFit
from .method.capa_model import apply_capa
from .config import CapaConfig
from .models import adapter_for, cast_model
from .pipeline import DEFAULT_MODEL

def sizes() -> dict[str, str]:
    """Benchmark sizes -> their family: the embedded models ("tiny" = the default) and every
    family's random-weight real sizes."""
    from .models import embedded_models, families

    named = {"tiny": embedded_models()[DEFAULT_MODEL][0]}
    named.update({name: family for name, (family, _) in embedded_models().items()})
    for family in families().values():
        named.update({size: family.name for size in family.bench_sizes})
    return named


def build_model(size: str, dtype: torch.dtype, device: str):
    """(model in dtype on device, visual tokens to feed, a processor of its family)."""
    from .models import embedded_models, families, load_model

    known = sizes()
    if size not in known:
        from .errors import CapaError

        raise CapaError(f"benchmark size {size!r} is unknown; expected one of {', '.join(known)}")
    name = DEFAULT_MODEL if size == "tiny" else size
    family = families()[known[size]]
    if name in embedded_models():
        model, processor = load_model(name)
    else:
        model, _ = family.bench_model(size, device)
        tiny = next(n for n, (f, _) in embedded_models().items() if f == family.name)
        processor = load_model(tiny)[1]
    model = cast_model(model, dtype).to(device).eval()
    return model, adapter_for(model).family.visual_token_range(processor)[1], processor


def timing_only_ffn(adapter, layers, rank, dtype, device) -> FfnApproximation:
    dim = adapter.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    fits = {}
    for layer in layers:
        if rank:
            u = torch.randn(dim, rank, generator=gen, device=device, dtype=dtype) / dim**0.5
            v = torch.randn(rank, dim, generator=gen, device=device, dtype=dtype) / rank**0.5
            fits[layer] = LayerFit(u @ v, torch.zeros(dim, device=device, dtype=dtype), u, v)
        else:
            fits[layer] = LayerFit(torch.randn(dim, dim, generator=gen, device=device, dtype=dtype) / dim**0.5,
                                   torch.zeros(dim, device=device, dtype=dtype))
    return FfnApproximation(fits, list(layers), adapter.fingerprint(), {"timing_only": True})


class Timer:
    def __init__(self, device: str, warmup: int, repeats: int):
        self.cuda = device.startswith("cuda")
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        return {"median_ms": statistics.median(times), "p10_ms": pick(0.1), "p90_ms": pick(0.9), "runs": len(times)}


def measure_floors(device: str, dtype: torch.dtype, timer: Timer, smoke: bool) -> dict:
    n = 1024 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    matmul = timer(lambda: a @ a)
    peak = 2 * n**3 / (matmul["median_ms"] * 1e-3)
    buffer = torch.empty(64 << 20 if not smoke else 8 << 20, dtype=torch.uint8, device=device)
    other = torch.empty_like(buffer)
    copy = timer(lambda: other.copy_(buffer))
    bandwidth = 2 * buffer.numel() / (copy["median_ms"] * 1e-3)  # read + write
    return {"matmul_flops_per_s": peak, "copy_bytes_per_s": bandwidth}


def prefill_flops(adapter, length: int, num_visual: int, prune: list, ffn_layers, rank) -> float:
    """Multiply-adds x 2 of the decoder prefill (projections, attention, FFN, last-token head)."""
    parts = adapter.layer(0)
    dim, heads, kv, d = adapter.hidden_size, parts.num_heads, parts.num_kv_heads, parts.head_dim
    inter = parts.mlp.gate_proj.weight.shape[0] if hasattr(parts.mlp, "gate_proj") else 4 * dim
    flops, seq, visual = 0.0, length, num_visual
    stages = dict(prune)
    for layer in range(adapter.num_layers):
        if layer in stages:
            seq, visual = seq - visual + stages[layer], stages[layer]
        flops += 2 * seq * dim * (heads * d + 2 * kv * d) + 2 * seq * heads * d * dim  # q,k,v,o
        flops += 2 * 2 * seq * seq * heads * d / 2  # causal QK^T and PV
        if layer in ffn_layers:
            flops += 2 * 3 * (seq - visual) * dim * inter + 2 * visual * dim * (2 * rank if rank else dim)
        else:
            flops += 2 * 3 * seq * dim * inter
    return flops + 2 * dim * adapter.vocab_size


def run_benchmark(size: str = "tiny", dtype: str = "fp32", batch: int = 1, keeps=(64, 128, 192), text_tokens: int = 45,
                  ffn_modes=("none", "affine"), rank: int = 512, repeats: int = 20, warmup: int = 3,
                  device: str | None = None, smoke: bool = False, with_compile: bool = True,
                  with_engine: bool = True) -> dict:
    from .dtypes import torch_dtype as parse_dtype

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype == torch.bfloat16 and not device.startswith("cuda"):
        from .errors import CapaError

        raise CapaError("bf16 benchmarks need a CUDA device (no bf16 CPU kernels in ONNX Runtime); use fp32 or fp16")
    timer = Timer(device, warmup, repeats)
    model, num_visual, processor = build_model(size, torch_dtype, device)
    adapter = adapter_for(model)
    CapaConfig(prune=[(2, max(keeps))]).check_for_visual_tokens(num_visual)
    length = num_visual + text_tokens + 2
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(batch, length, adapter.hidden_size, generator=gen, device=device, dtype=torch_dtype) * 0.02
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).expand(*adapter.family.position_rows, batch, length)
    visual = torch.arange(2, 2 + num_visual, device=device)[None].expand(batch, num_visual)
    floors = measure_floors(device, torch_dtype, timer, smoke)
    weight_bytes = sum(p.numel() * p.element_size() for p in adapter.text_model.parameters())
    weight_bytes += adapter.lm_head.weight.numel() * adapter.lm_head.weight.element_size()
    results = []

    def record(runtime, scenario, timing, flops, extra=None):
        entry = {"runtime": runtime, **scenario, **timing, "flops": flops,
                 "compute_floor_ms": flops / floors["matmul_flops_per_s"] * 1e3,
                 "weight_floor_ms": weight_bytes / floors["copy_bytes_per_s"] * 1e3}
        entry["ratio_to_floor"] = timing["median_ms"] / max(entry["compute_floor_ms"], entry["weight_floor_ms"])
        if device.startswith("cuda"):
            entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        results.append({**entry, **(extra or {})})

    with torch.no_grad():
        lm = adapter.text_model
        hf = lambda: adapter.lm_head(lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1])  # noqa: E731
        model.config._attn_implementation = lm.config._attn_implementation = "sdpa"
        base = {"keep": num_visual, "ffn": "none", "prune_layer": None}
        record("hf_sdpa_unpruned", base, timer(hf), prefill_flops(adapter, length, num_visual, [], [], None))
        ffn_range = list(range(3, adapter.num_layers - 1))
        for keep in keeps:
            for ffn_mode in ffn_modes:
                ffn_rank = rank if ffn_mode == "rank" else None
                layers = ffn_range if ffn_mode != "none" else []
                approx = timing_only_ffn(adapter, layers, ffn_rank, torch_dtype, device) if layers else None
                scenario = {"keep": keep, "ffn": ffn_mode if ffn_mode != "rank" else f"rank{rank}", "prune_layer": 2}
                flops = prefill_flops(adapter, length, num_visual, [(2, keep)], layers, ffn_rank)
                for runtime, variant in (("fastv_eager", "attention"), ("capa_eager", "contrib")):
                    if runtime == "fastv_eager" and ffn_mode != "none":
                        continue
                    capa = apply_capa(model, CapaConfig(prune=[(2, keep)], variant=variant, ffn_layers=layers), approx)
                    weight = capa.query_weight(visual, mask)
                    step = lambda capa=capa, weight=weight: capa.prefill_layers(  # noqa: E731
                        embeds, positions, mask, visual, weight, select=capa.select_tokens)
                    state = step()
                    kv_bytes = sum(t.numel() * t.element_size() for t in state.keys + state.values)
                    record(runtime, scenario, timer(step), flops, {"kv_cache_bytes": kv_bytes})
                if with_compile and ffn_mode == "none" and keep == keeps[0]:  # compiling takes minutes at 7B
                    record_compiled(record, timer, model, keep, embeds, positions, mask, visual, scenario, flops)
                if with_engine and ffn_mode == "none":
                    record_engine(record, timer, model, processor, keep, embeds, mask, positions, visual, scenario,
                                  flops, torch_dtype, device)
    import onnxruntime
    import transformers

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(device),
            "size": size, "dtype": dtype, "batch": batch, "sequence": length, "visual_tokens": num_visual,
            "smoke": smoke, "floors": floors, "weight_bytes": weight_bytes,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
            "results": results}


def record_compiled(record, timer, model, keep, embeds, positions, mask, visual, scenario, flops):
    capa = apply_capa(model, CapaConfig(prune=[(2, keep)]))
    weight = capa.query_weight(visual, mask)
    from .method.scoring import contribution_scores_dense

    def select(probs, values, o_weight, keep):  # no Python data-dependence: compilable
        scores = contribution_scores_dense(probs, values, o_weight, "contrib")
        return torch.sort(torch.topk(scores, keep, dim=-1).indices, dim=-1).values

    try:
        compiled = torch.compile(lambda: capa.prefill_layers(embeds, positions, mask, visual, weight, select=select))
        compiled()
        record("capa_torch_compile", scenario, timer(compiled), flops)
    except Exception as exc:  # report why, keep benchmarking the others
        record("capa_torch_compile", scenario, {"median_ms": float("nan"), "p10_ms": None, "p90_ms": None, "runs": 0},
               flops, {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})


def record_engine(record, timer, model, processor, keep, embeds, mask, positions, visual, scenario, flops, dtype,
                  device):
    import onnxruntime as ort

    from .dtypes import name_of
    from .export.exporter import export_graphs
    from .validate import to_feed

    capa = apply_capa(model, CapaConfig(prune=[(2, keep)]))
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    if device.startswith("cuda") and providers[0] != "CUDAExecutionProvider":
        record("ort_engine", scenario, {"median_ms": float("nan"), "p10_ms": None, "p90_ms": None, "runs": 0}, flops,
               {"skipped": "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"})
        return
    with tempfile.TemporaryDirectory() as tmp:
        contract = export_graphs(capa, processor, Path(tmp), "function", progress=False, graphs=("prefill",))
        session = ort.InferenceSession(str(Path(tmp) / "prefill.onnx"), providers=providers)
        feed = to_feed(contract["prefill"], {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                             "visual_positions": visual}, name_of(dtype))
        record("ort_engine", scenario, timer(lambda: session.run(["logits"], feed)), flops,
               {"providers": providers, "note": "session.run with host arrays (copies included)"})


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for runtime in sorted({r["runtime"] for r in report["results"]}):
        rows = sorted((r for r in report["results"] if r["runtime"] == runtime and r["ffn"] == "none"
                       and r["median_ms"] == r["median_ms"]), key=lambda r: r["keep"])
        if rows:
            ax.plot([r["keep"] for r in rows], [r["median_ms"] for r in rows], marker="o", label=runtime)
    ax.set_xlabel("visual tokens kept after layer 2")
    ax.set_ylabel("prefill median (ms)")
    ax.set_title(f"{report['size']} {report['dtype']} batch {report['batch']} on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    rows = [f"{'runtime':<20} {'keep':>5} {'ffn':>8} {'median ms':>10} {'p10-p90 ms':>15} {'x floor':>8}"]
    for r in report["results"]:
        spread = f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}" if r.get("p10_ms") is not None else r.get("skipped", "")[:15]
        rows.append(f"{r['runtime']:<20} {r['keep']:>5} {r['ffn']:>8} {r['median_ms']:>10.2f} {spread:>15} "
                    f"{r['ratio_to_floor']:>8.1f}")
    return "\n".join(rows)


def save(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    return out
