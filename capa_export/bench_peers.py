"""The benchmark's peers, each run in its own process by `capa-export bench` (capa_export/bench.py).

    python path/to/capa_export/bench_peers.py SPEC.json

(run as a file, not as a module of the package: the package imports torch, which the ONNX Runtime
GenAI peer does not need and whose memory it must not be charged with; what a peer needs it imports.)

SPEC names one peer, the work folder (model, inputs, calibrations, engines) and the timing settings;
the peer loads what it runs once, then for each visual-token count runs `warmup + repeats` greedy
generations of `new_tokens` tokens on the saved inputs, timing each phase, and writes its result
JSON to SPEC["out"]. A process per peer keeps peak-memory figures apart (the parent reads the
process's peak RSS when it exits; the peer resets its high-water mark between phases with
/proc/self/clear_refs) and keeps one runtime's thread pools and allocator out of another's timings.

Phases, in milliseconds per run: vision (image features), prefill (embeddings + decoder over the
prompt + first-token logits; pruning inside for the pruned peers), time_to_first_token (vision +
prefill, + the engine's embedding graph), decode_per_token (the mean over the new tokens after the
first, each one forward with the KV cache).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PHASES = ("vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_per_token_ms")


# --- memory -----------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set since start or the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Start a new high-water mark at the current RSS (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # not Linux, or not allowed: the mark then covers the whole process
        pass


# --- timing -----------------------------------------------------------------------------------------
class Clock:
    """perf_counter, with a device synchronisation before each reading on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


def summarize(values: list[float]) -> dict:
    """median and 10th / 90th percentiles (nearest rank) of the timed runs."""
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9), "runs": len(ordered)}


def load_inputs(work: Path, visual: int) -> dict[str, np.ndarray]:
    with np.load(work / f"inputs-{visual}.npz") as saved:
        return {k: saved[k] for k in saved.files}


# --- peers: each returns a callable run(inputs, new_tokens) -> (phases ms, tokens [B, T], keep | None)
def _torch_setup(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    return torch


def hf_sdpa(spec: dict):
    """HF transformers, unpruned, SDPA attention: the model's own get_image_features, the
    placeholder merge, the language model with its DynamicCache and lm_head, as
    LlavaForConditionalGeneration.forward runs them."""
    torch = _torch_setup(spec)
    from capa_export.dtypes import torch_dtype
    from capa_export.models import load_model

    device = spec["device"]
    model, _ = load_model(spec["model_dir"], torch_dtype(spec["dtype"]), device)
    model.set_attn_implementation("sdpa")
    clock = Clock(device)
    inner, embed = model.model, model.get_input_embeddings()

    def greedy(embeds, mask, new_tokens, on_first=lambda: None):
        out = inner.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
        on_first()
        tokens, cache = [token], out.past_key_values
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = inner.language_model(inputs_embeds=embed(token), attention_mask=mask, past_key_values=cache,
                                       use_cache=True)
            token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, 1).cpu().numpy()

    @torch.no_grad()
    def run(inputs, new_tokens):
        ids = torch.as_tensor(inputs["input_ids"], device=device)
        mask = torch.as_tensor(inputs["attention_mask"], device=device)
        pixels = torch.as_tensor(inputs["pixel_values"], device=device, dtype=model.dtype)
        sizes = {"image_sizes": torch.as_tensor(inputs["image_sizes"], device=device)} if "image_sizes" in inputs else {}
        marks = [clock()]
        features = torch.cat(list(inner.get_image_features(pixel_values=pixels, **sizes).pooler_output), dim=0)
        marks.append(clock())
        embeds = embed(ids)
        embeds = embeds.masked_scatter(inner.get_placeholder_mask(ids, embeds, features), features.to(embeds.dtype))
        tokens = greedy(embeds, mask, new_tokens, on_first=lambda: marks.append(clock()))
        marks.append(clock())
        return _phases(marks[0], marks[1], marks[1], marks[2], marks[3], new_tokens), tokens, None

    @torch.no_grad()
    def text_only_reference(inputs, new_tokens):
        """Greedy tokens of the decoder alone on input_ids (image tokens embedded as ordinary ids):
        what the ONNX Runtime GenAI peer, a text-only decoder, is given. Untimed."""
        ids = torch.as_tensor(inputs["input_ids"], device=device)
        mask = torch.as_tensor(inputs["attention_mask"], device=device)
        return greedy(embed(ids), mask, new_tokens)

    run.text_only_reference = text_only_reference
    return run


def capa_eager(spec: dict):
    """The CapaModel in eager PyTorch (FastV when the config's variant is `attention`): vision by
    the family adapter, prefill with pruning (and FFN approximation), decode with its per-segment cache."""
    torch = _torch_setup(spec)
    from capa_export.config import CapaConfig
    from capa_export.dtypes import torch_dtype
    from capa_export.method.capa_model import apply_capa
    from capa_export.models import load_model
    from capa_export.pipeline import load_calibration

    device = spec["device"]
    model, _ = load_model(spec["model_dir"], torch_dtype(spec["dtype"]), device)
    if spec.get("calibration"):
        config, approx = load_calibration(model, spec["calibration"])
        if approx is not None:
            approx = approx.cast(model.dtype)
    else:
        config, approx = CapaConfig(**spec["capa_config"]), None
    capa = apply_capa(model, config, approx)
    clock = Clock(device)

    @torch.no_grad()
    def run(inputs, new_tokens):
        ids = torch.as_tensor(inputs["input_ids"], device=device)
        mask = torch.as_tensor(inputs["attention_mask"], device=device)
        pixels = torch.as_tensor(inputs["pixel_values"], device=device, dtype=model.dtype)
        sizes = {"image_sizes": torch.as_tensor(inputs["image_sizes"])} if "image_sizes" in inputs else {}
        start = clock()
        # the family's packing (LLaVA-NeXT: unpad, row newlines) is part of the vision stage, as in HF
        features = capa.family.pack_image_features(capa.adapter.image_features(pixel_values=pixels),
                                                   {"pixel_values": pixels, **sizes})
        vision = clock()
        out = capa(ids, attention_mask=mask, image_features=features, use_cache=True, last_logits_only=True, **sizes)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = clock()
        tokens, cache = [token], out.past_key_values
        for _ in range(new_tokens - 1):
            step = capa(token, past_key_values=cache, last_logits_only=True)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        done = clock()
        return (_phases(start, vision, vision, prefill, done, new_tokens), torch.cat(tokens, 1).cpu().numpy(),
                out.keep_indices.cpu().numpy())

    return run


def engine(spec: dict):
    """A built engine folder through the runtime's public call, CapaEngine.generate_ids, whose own
    per-stage timings are used."""
    _torch_setup(spec)
    import inspect

    from capa_export.runtime import CapaEngine

    options = {}
    if "threads" in inspect.signature(CapaEngine).parameters:  # runtimes that take a thread count
        options["threads"] = spec["threads"]
    runtime = CapaEngine(spec["engine_dir"], **options)

    def run(inputs, new_tokens):
        tokens, keep, timings = runtime.generate_ids(dict(inputs), new_tokens)
        phases = {"vision_ms": timings["vision"] * 1e3, "prefill_ms": timings["prefill"] * 1e3,
                  "time_to_first_token_ms": timings["time_to_first_token"] * 1e3,
                  "decode_per_token_ms": timings["decode_per_token"] * 1e3}
        return phases, np.asarray(tokens), np.asarray(keep)

    run.threads = options.get("threads", "onnxruntime default (one per physical core)")
    return run


def genai(spec: dict):
    """ONNX Runtime GenAI's Generator on the model builder's export of the same decoder (text only:
    it is given input_ids, image tokens included as ordinary ids). Its prefill is append_tokens;
    each generate_next_token after the first runs the decoder for one token."""
    import onnxruntime_genai as og

    model = og.Model(og.Config(spec["genai_dir"]))

    def run(inputs, new_tokens):
        ids = np.ascontiguousarray(inputs["input_ids"], dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()  # selects the first token from the prompt's logits
        first = time.perf_counter()
        tokens = [generator.get_next_tokens().copy()]
        steps = 0
        while len(tokens) < new_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens.append(generator.get_next_tokens().copy())
            steps += 1
        done = time.perf_counter()
        prefill = (first - start) * 1e3
        phases = {"vision_ms": None, "prefill_ms": prefill, "time_to_first_token_ms": prefill,
                  "decode_per_token_ms": (done - first) * 1e3 / steps if steps else None}
        return phases, np.stack(tokens, axis=1).astype(np.int64), None

    return run


def _phases(start, vision_end, prefill_start, prefill_end, done, new_tokens) -> dict:
    vision = (vision_end - start) * 1e3
    prefill = (prefill_end - prefill_start) * 1e3
    return {"vision_ms": vision, "prefill_ms": prefill, "time_to_first_token_ms": (prefill_end - start) * 1e3,
            "decode_per_token_ms": (done - prefill_end) * 1e3 / (new_tokens - 1) if new_tokens > 1 else None}


RUNNERS = {"hf": hf_sdpa, "capa": capa_eager, "engine": engine, "genai": genai}


# --- measurements that are not peers -----------------------------------------------------------------
def floors(spec: dict) -> dict:
    """The machine's matmul rate in the benchmark's dtype and thread count (the FLOP floor's
    denominator), and its copy bandwidth (read + write; the weight-read floor's)."""
    torch = _torch_setup(spec)
    from capa_export.dtypes import torch_dtype

    device, dtype = spec["device"], torch_dtype(spec["dtype"])
    clock = Clock(device)
    n = spec["matmul_size"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(spec["floor_warmup"] + spec["floor_repeats"]):
        start = clock()
        torch.mm(a, b)
        if i >= spec["floor_warmup"]:
            times.append(clock() - start)
    matmul = statistics.median(times)
    buffer = torch.empty(spec["copy_bytes"], dtype=torch.uint8, device=device)
    target = torch.empty_like(buffer)
    target.copy_(buffer)
    copies = []
    for _ in range(spec["floor_repeats"]):
        start = clock()
        target.copy_(buffer)
        copies.append(clock() - start)
    copy = statistics.median(copies)
    return {"matmul_size": n, "matmul_flops_per_s": 2 * n**3 / matmul, "copy_bytes": spec["copy_bytes"],
            "copy_bytes_per_s": 2 * spec["copy_bytes"] / copy, "threads": spec["threads"]}


PROFILE_RUNS = 3  # prefill runs per profiled session; the last is summarised


def profile_engine(spec: dict) -> dict:
    """ONNX Runtime's own profile of one prefill of a built engine per visual-token count: time per
    operator type, summed over nodes, and the total of the run. The prefill's inputs come from the
    engine's vision and embed graphs on the benchmark's inputs."""
    import onnxruntime as ort
    import torch

    from capa_export.contract import to_feed_array
    from capa_export.manifest import read_manifest
    from capa_export.models import family_from_info

    engine_dir = Path(spec["engine_dir"])
    manifest = read_manifest(engine_dir, verify=False)
    family = family_from_info(manifest["model"])
    contract = family.graph_contract(manifest["layer_segment"])
    backend_dir = engine_dir / manifest["backend_dir"]
    description = json.loads((backend_dir / "session.json").read_text())
    providers = [p if isinstance(p, str) else tuple(p) for p in description["providers"]]

    def session(graph, profile_prefix=None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # applied at build
        options.intra_op_num_threads = spec["threads"]
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return ort.InferenceSession(str(backend_dir / description["graphs"][graph]), options, providers=providers)

    def infer(sess, graph, values):
        feed = {t.name: to_feed_array(t, values[t.name], manifest["dtype"]) for t in contract[graph].inputs}
        return sess.run(None, feed)

    vision, embed = session("vision"), session("embed")
    results = {}
    for visual in spec["visual"]:
        inputs = {k: torch.as_tensor(v) for k, v in load_inputs(Path(spec["work"]), visual).items()}
        # the runtime's own steps (CapaEngine.generate_ids): vision, the family's packing, embed, merge
        features = torch.as_tensor(infer(vision, "vision", {k: inputs[k] for k in family.vision_keys})[0])
        features = family.pack_image_features(features, inputs)
        embeds = torch.as_tensor(infer(embed, "embed", {"input_ids": inputs["input_ids"]})[0])
        embeds = family.merge_image_features(inputs["input_ids"], embeds, features)
        layout = manifest["capa_config"].get("prune_layout_tokens", False)
        values = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"],
                  "position_ids": family.prefill_positions(inputs),
                  "visual_positions": family.visual_positions(inputs["input_ids"], inputs, layout_candidates=layout)}
        prefill = session("prefill", str(Path(spec["out"]).with_suffix("")) + f"-{visual}")
        # two warm-ups: the first run's allocations and the second's (ONNX Runtime's arena still grows
        # then; measured at 2,928 visual tokens: 1.8x the steady run) are not the steady state
        for _ in range(PROFILE_RUNS):
            infer(prefill, "prefill", values)
        trace = prefill.end_profiling()
        results[str(visual)] = summarize_profile(json.loads(Path(trace).read_text()), runs=PROFILE_RUNS)
        Path(trace).unlink()
        del prefill
    return {"engine_dir": str(engine_dir), "profiles": results}


def summarize_profile(events: list, runs: int, top: int = 12) -> dict:
    """Kernel time per operator type in the last of `runs` model runs of an ONNX Runtime trace."""
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = model_runs[-1] if model_runs else None
    per_op: dict[str, float] = {}
    per_node: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if last is not None and not last["ts"] <= event["ts"] <= last["ts"] + last["dur"]:
            continue
        op = event.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1e3
        node = event["name"][: -len("_kernel_time")]
        per_node[node] = per_node.get(node, 0.0) + event["dur"] / 1e3
    kernels = sum(per_op.values())
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])
    nodes = sorted(per_node.items(), key=lambda kv: -kv[1])
    return {"runs": runs, "model_run_ms": last["dur"] / 1e3 if last else None, "kernel_ms": kernels,
            "by_op_type": [{"op": op, "ms": ms, "share": ms / kernels if kernels else 0.0} for op, ms in ops[:top]],
            "slowest_nodes": [{"node": n, "ms": ms} for n, ms in nodes[:top]]}


# --- entry point ------------------------------------------------------------------------------------
def run_peer(spec: dict) -> dict:
    work = Path(spec["work"])
    reset_peak_rss()
    start = time.perf_counter()
    run = RUNNERS[spec["runner"]](spec)
    result = {"peer": spec["peer"], "load_seconds": time.perf_counter() - start, "load_peak_rss_bytes": peak_rss_bytes(),
              "threads": getattr(run, "threads", spec["threads"]), "visual": {}}
    for visual in spec["visual"]:
        inputs = load_inputs(work, visual)
        reset_peak_rss()
        timed = {phase: [] for phase in PHASES}
        tokens = keep = None
        for index in range(spec["warmup"] + spec["repeats"]):
            phases, tokens, keep = run(inputs, spec["new_tokens"])
            if index >= spec["warmup"]:
                for phase in PHASES:
                    if phases[phase] is not None:
                        timed[phase].append(phases[phase])
        entry = {phase: summarize(values) if values else None for phase, values in timed.items()}
        entry.update(peak_rss_bytes=peak_rss_bytes(), tokens=tokens.tolist(),
                     keep_indices=None if keep is None else keep.tolist())
        if hasattr(run, "text_only_reference"):
            entry["text_only_tokens"] = run.text_only_reference(inputs, spec["new_tokens"]).tolist()
        result["visual"][str(visual)] = entry
    # the marks were reset between phases, so the process's peak is the largest of them
    result["process_peak_rss_bytes"] = max([result["load_peak_rss_bytes"], peak_rss_bytes()]
                                           + [e["peak_rss_bytes"] for e in result["visual"].values()])
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["task"] in ("prepare", "inputs"):
        from capa_export.bench import make_inputs, prepare

        task = prepare if spec["task"] == "prepare" else make_inputs
    else:
        task = {"floors": floors, "profile": profile_engine, "peer": run_peer}[spec["task"]]
    result = task(spec)
    out = Path(spec["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
