"""`capa-export bench`: one run that times CAPA against its peers, on the same inputs, on one machine.

    capa-export bench --size mid --visual 576 2880 --keep 64       # the benchmark (minutes to an hour)
    capa-export bench --smoke                                      # CI: the same path on tiny-llava-random

What one run does, in a work folder (default out/bench/<size>-<dtype>):

1. saves a random-weight model of the size (`save_pretrained`: LLaVA with its CLIP tower; the same
   decoder alone as a Llama checkpoint + tokenizer.json for ONNX Runtime GenAI) and the inputs: per
   visual-token count, a prompt of [BOS, N image tokens, text] with N / 576 built-in pictures;
2. runs the user-facing commands in child processes, reading each one's peak RSS when it exits:
   `calibrate` (no pruning; pruning; pruning + affine FFN), `export` once, `build` of each engine
   (ONNX Runtime, validated against the CapaModel by Polygraphy as every build is), and GenAI's
   model builder on the decoder checkpoint;
3. measures the machine's matmul rate and copy bandwidth in the benchmark's dtype and thread count;
4. runs each peer in its own process (capa_export/bench_peers.py): HF transformers SDPA unpruned,
   FastV-style pruning and the CapaModel in eager PyTorch, the ONNX Runtime engines (unpruned,
   CAPA, CAPA + affine FFN) through CapaEngine, and ONNX Runtime GenAI's Generator (decode peer);
5. checks the engines on the benchmark's own inputs against their eager references (kept indices
   and greedy tokens equal), profiles the CAPA engines' prefill with ONNX Runtime's profiler, and
   writes JSON + PNG + a Markdown table (optionally into BENCHMARKS.md).

Floors: FLOPs / measured matmul rate (compute), bytes read / measured copy bandwidth (memory: the
decode step's weights and KV cache). Decoder FLOPs are counted analytically (projections, causal
attention, FFN, approximated FFN rows, the last token's head); vision FLOPs are counted by PyTorch's
FlopCounterMode over the family's vision function (what it executes, the discarded last CLIP layer
included). Ratios are time / floor: 1.0 would be the machine's peak.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artifacts import write_json
from .errors import CapaError
from .pipeline import DEFAULT_MODEL

#: peer -> (runner in bench_peers, label, the calibration/engine it uses, the peer its outputs must equal)
PEERS = {
    "hf_sdpa": ("hf", "HF transformers SDPA, unpruned", None, None),
    "fastv_eager": ("capa", "FastV (attention score), eager", "fastv", None),
    "capa_eager": ("capa", "CapaModel eager, contrib", "capa", None),
    "capa_eager_affine": ("capa", "CapaModel eager, contrib + affine FFN", "capa_affine", None),
    "ort_unpruned": ("engine", "ONNX Runtime engine, unpruned", "unpruned", "hf_sdpa"),
    "capa_engine": ("engine", "CAPA engine (ONNX Runtime)", "capa", "capa_eager"),
    "capa_engine_affine": ("engine", "CAPA engine, affine FFN", "capa_affine", "capa_eager_affine"),
    "genai": ("genai", "ONNX Runtime GenAI, unpruned (text ids)", None, None),
}
ENGINE_PEERS = tuple(p for p, (runner, *_rest) in PEERS.items() if runner == "engine")
#: the CAPA engines the targets are about
CAPA_ENGINES = ("capa_engine", "capa_engine_affine")
FLOOR_TARGET = 1.3
PHASES = ("vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_per_token_ms")


def speedup_target(visual: int) -> float | None:
    """The prefill speed-up over HF SDPA unpruned a CAPA engine must reach (keep 64 after layer 2):
    4x with one LLaVA-1.5 picture (576 visual tokens), 6x with a LLaVA-NeXT-sized prompt (2,880 = five
    such pictures; 2,928 = one anyres picture); none set for other counts."""
    return 4.0 if visual == 576 else 6.0 if visual >= 2880 else None


# --- sizes ------------------------------------------------------------------------------------------
def sizes() -> dict[str, str]:
    """Benchmark sizes -> their family: the embedded models ("tiny" = the default) and every
    family's random-weight real sizes."""
    from .models import embedded_models, families

    named = {"tiny": embedded_models()[DEFAULT_MODEL][0]}
    named.update({name: family for name, (family, _) in embedded_models().items()})
    for family in families().values():
        named.update({size: family.name for size in family.bench_sizes})
    return named


def build_model(size: str, dtype, device: str):
    """(model in dtype on device, visual tokens of its prompt, a processor of its family)."""
    from .models import adapter_for, cast_model, embedded_models, families, load_model

    known = sizes()
    if size not in known:
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


def visual_tokens_per_image(size: str) -> int:
    """Visual tokens one picture gives at this size (its family's embedded model has the same geometry)."""
    from .models import adapter_for, embedded_models, load_model

    family = sizes()[size]
    tiny = next(n for n, (f, _) in embedded_models().items() if f == family)
    return adapter_for(load_model(tiny)[0]).num_visual_tokens_per_image()


# --- settings ---------------------------------------------------------------------------------------
def default_visual(per_image: int) -> list[int]:
    """Visual tokens of the default prompts: one picture, and five when a picture is LLaVA-1.5's 576
    (2,880: a LLaVA-NeXT-sized prompt); a size whose picture is already anyres-sized, one picture."""
    return [per_image, 5 * per_image] if per_image == 576 else [per_image]


@dataclass
class Settings:
    size: str = "mid"
    dtype: str = "fp32"
    device: str = "cpu"
    batch: int = 1
    visual: list[int] | None = None  # None: `default_visual` of the size
    keep: int = 64
    prune_layer: int = 2
    text_tokens: int = 46
    new_tokens: int = 16
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None  # None: every core
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    ffn_layers: list[int] | None = None  # None: 3 .. L-2
    calibration_count: int = 8
    validate_tokens: int = 8
    build_jobs: int = 1
    profile: bool = True
    reuse: bool = False
    smoke: bool = False
    matmul_size: int | None = None  # None: 4096 on CPU, 8192 on a GPU
    copy_bytes: int | None = None  # None: 512 MiB on CPU, 2 GiB on a GPU (beyond the caches)
    work: str = ""

    @classmethod
    def for_smoke(cls, **overrides) -> "Settings":
        """The CI path: every peer and step on tiny-llava-random (8 layers, so that the affine-FFN
        engine has layers 3-6 to approximate after the stage at 2), a few runs. Says nothing about speed."""
        values = dict(size="tiny-llava-random", visual=[576], keep=64, new_tokens=4, repeats=2, warmup=1, calibration_count=2,
                      validate_tokens=2, build_jobs=3, matmul_size=512, copy_bytes=16 << 20, smoke=True)
        values.update(overrides)
        return cls(**values)


def check_settings(s: Settings) -> Settings:
    """Every bad value refused with one line before anything is written."""
    from .config import CapaConfig
    from .dtypes import NAMES

    if s.size not in sizes():
        raise CapaError(f"--size {s.size!r} is unknown; expected one of {', '.join(sizes())}")
    if s.dtype not in NAMES:
        raise CapaError(f"--dtype {s.dtype!r} is unknown; expected one of {', '.join(NAMES)}")
    if s.dtype == "bf16" and not s.device.startswith("cuda"):
        raise CapaError("--dtype bf16 needs --device cuda (ONNX Runtime and this CPU path have no bf16 kernels); "
                        "use fp32 or fp16")
    gpu = s.device.startswith("cuda")
    s.matmul_size = s.matmul_size or (8192 if gpu else 4096)
    s.copy_bytes = s.copy_bytes or ((2 << 30) if gpu else (512 << 20))
    for name in ("batch", "repeats", "new_tokens", "text_tokens", "calibration_count", "validate_tokens",
                 "build_jobs", "matmul_size", "copy_bytes"):
        if getattr(s, name) < 1:
            raise CapaError(f"--{name.replace('_', '-')} {getattr(s, name)} must be >= 1")
    if s.warmup < 0:
        raise CapaError(f"--warmup {s.warmup} must be >= 0")
    if s.threads is not None and s.threads < 1:
        raise CapaError(f"--threads {s.threads} must be >= 1")
    if s.device not in ("cpu", "cuda") and not s.device.startswith("cuda:"):
        raise CapaError(f"--device {s.device!r} must be cpu or cuda")
    unknown = [p for p in s.peers if p not in PEERS]
    if unknown or not s.peers:
        raise CapaError(f"--peers {' '.join(unknown) or '(none)'}: expected some of {', '.join(PEERS)}")
    per_image = visual_tokens_per_image(s.size)
    if s.visual is None:
        s.visual = default_visual(per_image)
    if not s.visual:
        raise CapaError("--visual needs at least one visual-token count")
    for count in s.visual:
        if count < per_image or count % per_image:
            raise CapaError(f"--visual {count} must be a positive multiple of {per_image} (visual tokens per "
                            f"picture at size {s.size}: the prompt holds N / {per_image} pictures)")
        CapaConfig(prune=[(s.prune_layer, s.keep)]).check_for_visual_tokens(count)
    s.threads = s.threads or os.cpu_count() or 1
    s.visual = sorted(set(s.visual))
    s.work = s.work or str(Path("out") / "bench" / f"{s.size}-{s.dtype}")
    return s


# --- child processes ----------------------------------------------------------------------------------
def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


#: Runs `TARGET ARGS...` (a module name, or a .py file) as __main__ and writes the process's peak RSS
#: (VmHWM) to a file when it ends. The kernel's ru_maxrss of a child cannot serve: exec records the
#: forking parent's high-water mark into it, so a child of a large parent reports at least that.
#: Inline, so that measuring imports nothing (this package imports torch).
MEASURE_PEAK_RSS = """
import json, runpy, sys
out, target, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [target, *args]
code = 0
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    if not isinstance(stop.code, (int, type(None))):
        print(stop.code, file=sys.stderr)
finally:
    with open("/proc/self/status") as status:
        peak = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), None)
    with open(out, "w") as handle:
        json.dump({"peak_rss_bytes": peak}, handle)
sys.exit(code)
"""
PEERS_SCRIPT = Path(__file__).with_name("bench_peers.py")


def start_measured(command: list[str], log: Path, env: dict) -> dict:
    """Start `python -m MODULE ARGS` (command = [MODULE or FILE.py, *ARGS]) in a child whose peak RSS is recorded."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_file = log.with_suffix(".rss.json")
    peak_file.unlink(missing_ok=True)
    handle = open(log, "w")
    wrapped = [sys.executable, "-c", MEASURE_PEAK_RSS, str(peak_file), *command]
    process = subprocess.Popen(wrapped, stdout=handle, stderr=subprocess.STDOUT, env=env)
    return {"process": process, "log": log, "handle": handle, "start": time.perf_counter(), "command": command,
            "peak_file": peak_file}


def finish_measured(started: dict) -> dict:
    """Wait for a child started by start_measured: exit status, seconds, its peak RSS."""
    process = started["process"]
    process.wait()
    started["handle"].close()
    try:
        peak = json.loads(started["peak_file"].read_text())["peak_rss_bytes"]
    except (OSError, ValueError, KeyError):
        peak = None  # killed before it could say
    return {"returncode": process.returncode, "seconds": round(time.perf_counter() - started["start"], 2),
            "peak_rss_bytes": peak, "log": str(started["log"]), "command": " ".join(started["command"])}


def run_measured(command: list[str], log: Path, env: dict) -> dict:
    return finish_measured(start_measured(command, log, env))


def log_tail(path: str | Path, lines: int = 6) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def cli(*args: str) -> list[str]:
    return ["capa_export.cli", *args]


class Steps:
    """The work folder's record of finished steps (what made them, what they measured), so that
    --reuse skips a step whose settings and outputs are unchanged."""

    def __init__(self, work: Path, reuse: bool):
        self.path = work / "steps.json"
        self.reuse = reuse
        self.done = json.loads(self.path.read_text()) if reuse and self.path.exists() else {}

    def reusable(self, name: str, settings: dict, output: Path) -> dict | None:
        entry = self.done.get(name)
        if self.reuse and entry and entry["settings"] == settings and output.exists():
            return {**entry["result"], "reused_from": entry["date"]}
        return None

    def record(self, name: str, settings: dict, result: dict) -> None:
        self.done[name] = {"settings": settings, "result": result,
                           "date": datetime.datetime.now().isoformat(timespec="seconds")}
        write_json(self.path, self.done)


# --- step 1: model and inputs (run in a child: bench_peers dispatches task "prepare" here) -------------
def prepare(spec: dict) -> dict:
    """Save the random-weight model and the decoder alone (for GenAI); describe the dimensions the
    FLOP counts need."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    from .dtypes import torch_dtype
    from .inputs import builtin_samples
    from .models import adapter_for

    torch.manual_seed(0)  # the same weights for every run of a size
    work = Path(spec["work"])
    model, per_image, processor = build_model(spec["size"], torch_dtype(spec["dtype"]), "cpu")
    adapter = adapter_for(model)
    text_config = adapter.text_model.config
    # rotary positions are computed, not tabled, but GenAI sizes its context from this field
    text_config.max_position_embeddings = max(int(text_config.max_position_embeddings or 0), spec["max_positions"])
    model_dir, decoder_dir = work / "model", work / "decoder"
    for path in (model_dir, decoder_dir):
        shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    if spec.get("decoder", True):
        decoder = LlamaForCausalLM(text_config).to(model.dtype)
        state = {f"model.{k}": v for k, v in adapter.text_model.state_dict().items()}
        state["lm_head.weight"] = adapter.lm_head.weight
        decoder.load_state_dict(state, strict=True)
        decoder.save_pretrained(decoder_dir)
        processor.tokenizer.save_pretrained(decoder_dir)
        del decoder, state

    layer = adapter.layer(0)
    mlp = layer.mlp
    dims = {"hidden": adapter.hidden_size, "layers": adapter.num_layers, "heads": layer.num_heads,
            "kv_heads": layer.num_kv_heads, "head_dim": layer.head_dim,
            "intermediate": mlp.gate_proj.weight.shape[0] if hasattr(mlp, "gate_proj") else 4 * adapter.hidden_size,
            "vocab": adapter.vocab_size, "visual_tokens_per_image": per_image, "image_token_id": adapter.image_token_id,
            "dtype_bytes": next(model.parameters()).element_size()}
    decoder_params = sum(p.numel() for p in adapter.text_model.layers.parameters())
    dims["decoder_layer_weight_bytes"] = decoder_params * dims["dtype_bytes"]
    dims["head_weight_bytes"] = (adapter.lm_head.weight.numel() + adapter.final_norm.weight.numel()) * dims["dtype_bytes"]
    dims["checkpoint_weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    dims["image_size"] = adapter.family.bench_image_size()
    image = _bench_picture(builtin_samples(1, seed=11)[0].image, dims["image_size"])
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.image_features(pixel_values=pixels.to(model.dtype))
    dims["vision_flops_per_image"] = int(counter.get_total_flops())
    # layout tokens (LLaVA-NeXT's row newlines) are not pruning candidates: an unpruned engine keeps the rest
    layout = adapter.family.layout_token_mask(adapter.family.encode(processor, [image], ["What is in the picture?"]))
    dims["layout_tokens_per_image"] = 0 if layout is None else int(layout.sum())
    return dims


def _bench_picture(image, size: list[int] | None):
    """A built-in picture at the family's benchmark size (LLaVA-NeXT: the pinpoint with most tokens)."""
    return image if size is None else image.resize((int(size[1]), int(size[0])))


def make_inputs(spec: dict) -> dict:
    """Per visual-token count N, the same prompt for every peer: [BOS, N image tokens, text] with
    N / (tokens per picture) built-in pictures, `batch` identical rows; saved as .npz (numpy only,
    so that a peer without torch reads it). Anyres families (LLaVA-NeXT) also get `image_sizes`, and
    their pictures are resized so that each gives the most tokens (`bench_image_size`)."""
    import numpy as np
    from transformers import AutoProcessor

    from .inputs import builtin_samples

    work = Path(spec["work"])
    processor = AutoProcessor.from_pretrained(str(work / "model"))
    per_image, image_token = spec["visual_tokens_per_image"], spec["image_token_id"]
    samples = builtin_samples(max(spec["visual"]) // per_image, seed=11)
    processed = processor.image_processor(images=[_bench_picture(s.image, spec.get("image_size")) for s in samples],
                                          return_tensors="np")
    pixels = processed["pixel_values"]
    text = np.random.default_rng(5).integers(3, 32000, spec["text_tokens"])
    text = np.where(text == image_token, 3, text)
    batch = spec["batch"]
    for visual in spec["visual"]:
        row = np.concatenate([[1], np.full(visual, image_token), text]).astype(np.int64)
        pictures = visual // per_image
        arrays = {"pixel_values": np.concatenate([pixels[:pictures]] * batch).astype(np.float32)}
        if "image_sizes" in processed:  # anyres: the host-side packing unpads each picture by its size
            arrays["image_sizes"] = np.concatenate([np.asarray(processed["image_sizes"])[:pictures]] * batch)
        np.savez(work / f"inputs-{visual}.npz", input_ids=np.tile(row, (batch, 1)),
                 attention_mask=np.ones((batch, row.size), dtype=np.int64), **arrays)
    return {"visual": spec["visual"]}


def max_positions(s: Settings) -> int:
    """Context the saved model declares: 4096, or the next power of two that holds the longest run."""
    longest = 1 + max(s.visual) + s.text_tokens + s.new_tokens
    return max(4096, 1 << (longest - 1).bit_length())


# --- FLOPs and bytes --------------------------------------------------------------------------------------
def prefill_flops(dims: dict, length: int, num_visual: int, prune: list, ffn_layers, rank=None,
                  causal: bool = True, scoring_rows: int = 0) -> float:
    """2 x multiply-adds of one prompt's decoder prefill: q/k/v/o projections, attention (half the
    score matrix when causal), the FFN (affine rows where approximated), the last token's head.
    The layer before a stage (CapaModel.prefill_layers) computes keys and values for every row, the
    probabilities of its `scoring_rows` over every key, and attention output, o_proj and FFN for the
    rows it keeps only (each over every key: counted whole, causal or not)."""
    dim, heads, kv, d, inter = dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"], dims["intermediate"]
    flops, seq, visual = 0.0, length, num_visual
    stages = dict(prune)
    for layer in range(dims["layers"]):
        flops += 2 * seq * dim * (2 * kv * d)  # keys and values: every row
        if layer + 1 in stages:
            rows, visual_out = seq - visual + stages[layer + 1], stages[layer + 1]
            flops += 2 * 2 * rows * seq * heads * d + 2 * scoring_rows * seq * heads * d
        else:
            rows, visual_out = seq, visual
            flops += 2 * 2 * seq * seq * heads * d * (0.5 if causal else 1.0)
        flops += 2 * seq * dim * heads * d + 2 * rows * heads * d * dim  # q (every row), o_proj
        if layer in ffn_layers:
            flops += 2 * 3 * (rows - visual_out) * dim * inter + 2 * visual_out * dim * (2 * rank if rank else dim)
        else:
            flops += 2 * 3 * rows * dim * inter
        seq, visual = rows, visual_out
    return flops + 2 * dim * dims["vocab"]


def cache_lengths(dims: dict, length: int, num_visual: int, prune: list) -> list[int]:
    """The KV length each layer holds after the prefill."""
    lengths, seq, stages = [], length, dict(prune)
    for layer in range(dims["layers"]):
        if layer in stages:
            seq = seq - num_visual + stages[layer]
            num_visual = stages[layer]
        lengths.append(seq)
    return lengths


def decode_flops(dims: dict, contexts: list[int]) -> float:
    """2 x multiply-adds of one new token attending to `contexts[layer]` keys (itself included)."""
    dim, heads, kv, d, inter = dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"], dims["intermediate"]
    per_layer = 2 * dim * (heads * d + 2 * kv * d) + 2 * heads * d * dim + 2 * 3 * dim * inter
    return sum(per_layer + 2 * 2 * ctx * heads * d for ctx in contexts) + 2 * dim * dims["vocab"]


def decode_bytes(dims: dict, contexts: list[int], batch: int = 1) -> float:
    """Bytes one decode step must read: every layer's weights and the head once, each row's KV cache."""
    kv = sum(2 * ctx * dims["kv_heads"] * dims["head_dim"] for ctx in contexts) * dims["dtype_bytes"] * batch
    return dims["decoder_layer_weight_bytes"] + dims["head_weight_bytes"] + kv


def peer_work(dims: dict, peer: str, visual: int, s: Settings, ffn_layers: list[int], batch: int) -> dict:
    """FLOPs (and bytes) of each phase for one peer at one visual-token count, for `batch` rows."""
    length = 1 + visual + s.text_tokens
    pruned = peer not in ("hf_sdpa", "ort_unpruned", "genai")
    prune = [(s.prune_layer, s.keep)] if pruned else []
    layers = ffn_layers if peer.endswith("_affine") else []
    # the pruning candidates: LLaVA-NeXT's row newlines stay in the sequence like text
    candidates = visual - dims.get("layout_tokens_per_image", 0) * visual // dims["visual_tokens_per_image"]
    # decode: step t (1 .. T-1) attends to the prompt's cache + t keys; on average + T/2
    contexts = [n + s.new_tokens / 2 for n in cache_lengths(dims, length, candidates, prune)]
    vision = 0.0 if peer == "genai" else dims["vision_flops_per_image"] * visual // dims["visual_tokens_per_image"]
    prefill = prefill_flops(dims, length, candidates, prune, layers, scoring_rows=s.text_tokens)
    return {"vision": vision * batch, "prefill": prefill * batch, "time_to_first_token": (vision + prefill) * batch,
            "decode_per_token": decode_flops(dims, contexts) * batch,
            "decode_bytes_per_token": decode_bytes(dims, contexts, batch)}


# --- the run ------------------------------------------------------------------------------------------------
def run_benchmark(settings: Settings, log=print) -> dict:
    s = check_settings(settings)
    work = Path(s.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work, s.reuse)
    env = child_env(s.threads)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    started = time.perf_counter()
    peers = [p for p in PEERS if p in s.peers]
    skipped = {}
    if "genai" in peers and importlib.util.find_spec("onnxruntime_genai") is None:
        skipped["genai"] = "onnxruntime-genai is not installed (pip install 'capa-export[bench]')"
        peers.remove("genai")
    needs = {PEERS[p][2] for p in peers if PEERS[p][0] == "engine"}

    def child_task(task: str, name: str, payload: dict) -> dict:
        spec_path = work / "specs" / f"{name}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        out = work / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        spec = {"task": task, "work": str(work), "out": str(out), "threads": s.threads, "device": s.device,
                "dtype": s.dtype, **payload}
        spec_path.write_text(json.dumps(spec, indent=1))
        measured = run_measured([str(PEERS_SCRIPT), str(spec_path)],
                                work / "logs" / f"{name}.log", env)
        if measured["returncode"] != 0 or not out.exists():
            return {"failed": f"exit {measured['returncode']}: {log_tail(measured['log'])}", **measured}
        return {**json.loads(out.read_text()), **measured}

    # 1. model + inputs
    # the decoder-only copy is GenAI's input: at 7B, 13-27 GB and minutes that no other peer needs
    prep_settings = {"size": s.size, "dtype": s.dtype, "max_positions": max_positions(s), "decoder": "genai" in peers}
    prepared = steps.reusable("prepare", prep_settings, work / "model" / "config.json")
    if prepared is not None and not {"image_size", "layout_tokens_per_image"} <= prepared.keys():
        prepared = None  # prepared by an older bench, which did not record the pictures' size
    if prepared is None:
        log(f"[bench] saving the {s.size} model to {work}")
        prepared = child_task("prepare", "prepare", prep_settings)
        if "failed" in prepared:
            raise CapaError(f"preparing the {s.size} model failed ({prepared['failed']})")
        steps.record("prepare", prep_settings, prepared)
    dims = {k: v for k, v in prepared.items() if k not in ("returncode", "seconds", "peak_rss_bytes", "log", "command",
                                                         "reused_from")}
    made = child_task("inputs", "inputs", {"visual": s.visual, "text_tokens": s.text_tokens, "batch": s.batch,
                                           "visual_tokens_per_image": dims["visual_tokens_per_image"],
                                           "image_token_id": dims["image_token_id"],
                                           "image_size": dims.get("image_size")})
    if "failed" in made:
        raise CapaError(f"writing the inputs failed ({made['failed']})")
    ffn_layers = s.ffn_layers if s.ffn_layers is not None else list(range(s.prune_layer + 1, dims["layers"] - 1))
    model_dir = work / "model"

    # 2. calibrate, export, build, GenAI's builder: the user-facing commands, peak RSS each
    memory, broken = {}, {}
    calibrations = {
        "unpruned": ["--prune", "--ffn-layers", "none"],
        "capa": ["--prune", f"{s.prune_layer}:{s.keep}", "--ffn-layers", "none"],
        "capa_affine": ["--prune", f"{s.prune_layer}:{s.keep}", "--ffn-layers", ",".join(map(str, ffn_layers))],
    }
    eager_configs = {PEERS[p][2] for p in peers if PEERS[p][0] == "capa"} - {"fastv"}
    # the export is measured on the largest engine's settings (pruning + affine FFN)
    for name in sorted(needs | eager_configs | ({"capa_affine"} if needs else set())):
        args = [*calibrations[name], "--calibration-count", str(s.calibration_count)]
        target = work / "calibration" / name
        key = {"args": args, "model": prep_settings}
        done = steps.reusable(f"calibrate:{name}", key, target)
        if done is None:
            log(f"[bench] capa-export calibrate ({name})")
            shutil.rmtree(target, ignore_errors=True)
            done = run_measured(cli("calibrate", "--model", str(model_dir), "--device", s.device, *args,
                                    "--out", str(target)),
                                work / "logs" / f"calibrate-{name}.log", env)
            if done["returncode"] != 0:
                raise CapaError(f"capa-export calibrate ({name}) failed (log {done['log']}): {log_tail(done['log'])}")
            steps.record(f"calibrate:{name}", key, done)
        memory[f"calibrate {name}"] = done

    profile_path = write_profile(work, s, dims)
    jobs = []  # (step, settings, what it must leave behind, command)
    if needs:
        key = {"model": prep_settings, "dtype": s.dtype, "calibration": calibrations["capa_affine"]}
        export_dir = work / "export-measured"
        jobs.append(("export", key, work / "steps.json", cli(
            "export", "--model", str(model_dir), "--device", s.device, "--dtype", s.dtype, "--calibrated",
            str(work / "calibration" / "capa_affine"), "--out", str(export_dir))))
    for name in sorted(needs):
        target = work / "engines" / name
        key = {"model": prep_settings, "calibration": calibrations[name], "profile": profile_path.read_text(),
               "validate_tokens": s.validate_tokens}
        jobs.append((f"build {name}", key, target / "manifest.json", cli(
            "build", "--model", str(model_dir), "--profile", str(profile_path), "--calibrated",
            str(work / "calibration" / name), "--validate-tokens", str(s.validate_tokens), "--out", str(target))))
    if "genai" in peers:
        key = {"model": prep_settings, "dtype": s.dtype, "threads": s.threads}
        jobs.append(("genai model builder", key, work / "genai" / "genai_config.json", [
            "onnxruntime_genai.models.builder", "-i", str(work / "decoder"), "-o",
            str(work / "genai"), "-p", "fp16" if s.dtype == "fp16" else "fp32", "-e",
            "cuda" if s.device.startswith("cuda") else "cpu", "-c", str(work / "genai-cache")]))
    pending = []
    for job in jobs:
        done = steps.reusable(job[0], job[1], job[2])
        if done is None:
            pending.append(job)
        else:
            memory[job[0]] = done
    for name, _, output, _ in pending:  # what a failed or interrupted earlier run left
        for stale in ((output.parent, output.parent.with_name(output.parent.name + ".failed"))
                      if name.startswith("build") else ()) + ((work / "genai",) if name.startswith("genai") else ()) \
                + ((work / "export-measured",) if name == "export" else ()):
            shutil.rmtree(stale, ignore_errors=True)
    for first in range(0, len(pending), s.build_jobs):
        group = pending[first:first + s.build_jobs]
        log("[bench] " + ", ".join(name for name, *_ in group))
        running = [start_measured(command, work / "logs" / f"{name.replace(' ', '-')}.log", env)
                   for name, _, _, command in group]
        for (name, key, output, _), handle in zip(group, running):
            done = finish_measured(handle)
            if name == "export":
                shutil.rmtree(work / "export-measured", ignore_errors=True)  # measured; the builds export their own
            if done["returncode"] != 0 or not output.exists():
                broken[name] = f"exit {done['returncode']} (log {done['log']}): {log_tail(done['log'])}"
                log(f"[bench] {name} failed: {broken[name]}")
                continue
            if name.startswith("genai"):
                set_genai_threads(work / "genai", s.threads)
                shutil.rmtree(work / "genai-cache", ignore_errors=True)
            steps.record(name, key, done)
            memory[name] = done
    for entry in memory.values():
        entry["weight_bytes"] = dims["checkpoint_weight_bytes"]
        peak = entry["peak_rss_bytes"]
        entry["ratio_to_weights"] = None if peak is None else peak / dims["checkpoint_weight_bytes"]
    validation = {name: engine_validation(work / "engines" / name) for name in sorted(needs)}

    # 3. floors, before the peers (and again after them: the better of the two is the machine's rate)
    def measure_floors(name: str) -> dict:
        log("[bench] measuring the matmul rate and copy bandwidth")
        measured = child_task("floors", name, {"matmul_size": s.matmul_size, "copy_bytes": s.copy_bytes,
                                               "floor_warmup": 1, "floor_repeats": 3})
        if "failed" in measured:
            raise CapaError(f"measuring the floors failed ({measured['failed']})")
        return {k: measured[k] for k in ("matmul_size", "matmul_flops_per_s", "copy_bytes", "copy_bytes_per_s",
                                         "threads")}

    floors_before = measure_floors("floors-before")

    # 4. peers
    results = {}
    for peer in peers:
        runner, label, config, _ = PEERS[peer]
        log(f"[bench] {peer}: {label}")
        payload = {"peer": peer, "runner": runner, "visual": s.visual, "repeats": s.repeats, "warmup": s.warmup,
                   "new_tokens": s.new_tokens, "model_dir": str(model_dir), "genai_dir": str(work / "genai")}
        if runner == "engine":
            payload["engine_dir"] = str(work / "engines" / config)
        elif runner == "capa" and config == "fastv":
            payload["capa_config"] = {"prune": [[s.prune_layer, s.keep]], "variant": "attention", "ffn_layers": []}
        elif runner == "capa":
            payload["calibration"] = str(work / "calibration" / config)
        missing = broken.get(f"build {config}") if runner == "engine" else broken.get("genai model builder") \
            if runner == "genai" else None
        if runner == "engine" and not missing and not validation[config]["passed"]:
            missing = f"the engine failed its validation ({work / 'engines' / config}/validation.json)"
        load = os.getloadavg()
        results[peer] = {"failed": missing} if missing else child_task("peer", peer, payload)
        # a shared machine's load while this peer ran: what its times can be compared under
        results[peer]["load_average"] = {"before": [round(x, 2) for x in load],
                                         "after": [round(x, 2) for x in os.getloadavg()]}

    # 5. profiles of the CAPA engines' prefill
    profiles = {}
    if s.profile:
        for peer in (p for p in CAPA_ENGINES if p in peers and "failed" not in results[p]):
            log(f"[bench] profiling {peer}'s prefill (ONNX Runtime profiler)")
            profiles[peer] = child_task("profile", f"profile-{peer}", {
                "engine_dir": str(work / "engines" / PEERS[peer][2]), "visual": s.visual})

    floors_after = measure_floors("floors-after")
    floors = {**floors_before, "matmul_flops_per_s": max(floors_before["matmul_flops_per_s"],
                                                         floors_after["matmul_flops_per_s"]),
              "copy_bytes_per_s": max(floors_before["copy_bytes_per_s"], floors_after["copy_bytes_per_s"]),
              "before": floors_before, "after": floors_after}
    versions = library_versions()
    report = {
        "date": date, "settings": asdict(s), "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(load_before), "versions": versions,
        "dims": dims, "ffn_layers": ffn_layers, "floors": floors, "memory": memory, "validation": validation,
        "rows": [], "checks": [], "targets": [], "profiles": profiles,
        "failed": {**broken, **{p: r["failed"] for p, r in results.items() if "failed" in r}}, "skipped": skipped,
    }
    report["rows"] = make_rows(results, dims, floors, s, ffn_layers)
    report["checks"] = make_checks(results, s, dims)
    report["targets"] = make_targets(report["rows"], s)
    return report


def write_profile(work: Path, s: Settings, dims: dict) -> Path:
    """The cpu profile with room for any prompt up to the saved model's context (so that engines
    are reused across --visual settings)."""
    typical = 1 + dims["visual_tokens_per_image"] + s.text_tokens
    context = max_positions(s)
    providers = '["CUDAExecutionProvider", "CPUExecutionProvider"]' if s.device.startswith("cuda") \
        else '["CPUExecutionProvider"]'
    # attention: the cpu profile's 8 blocks of fused attention (measured on CPU); on CUDA MatMul/Softmax
    # (ONNX Runtime's CUDA Attention refuses GQA and softmax_precision: build_profiles/edge.toml) and
    # an arena cap that holds a 7B model
    text = f"""# written by capa-export bench: the cpu profile, shapes for prompts of up to {context} tokens
name = "bench"
description = "capa-export bench engines"
backend = "onnxruntime"
precision = "{s.dtype}"
pruning = "function"
{'attention = "explicit"' if s.device.startswith("cuda") else "attention_blocks = 8"}
providers = {providers}
optimization_level = "all"
workspace_mib = {65536 if s.device.startswith("cuda") else 4096}

[shapes]
batch = [1, 1, {max(4, s.batch)}]
sequence = [8, {typical}, {context}]
past = [1, {typical + 16}, {context}]
images = [1, 1, {max(8, context // dims["visual_tokens_per_image"] * max(4, s.batch))}]
"""
    path = work / "profile.toml"
    path.write_text(text)
    return path


def set_genai_threads(genai_dir: Path, threads: int) -> None:
    """GenAI's session options come from its genai_config.json: the benchmark's thread count."""
    path = genai_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))


def engine_validation(engine_dir: Path) -> dict:
    """What `build` found when it validated the engine (Polygraphy against the CapaModel)."""
    try:
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        report = json.loads((engine_dir / "validation.json").read_text())
    except OSError as exc:
        return {"passed": False, "error": str(exc)}
    return {"passed": bool(manifest.get("complete")) and bool(report.get("passed")),
            "agreement": [e.get("agreement") for e in report.get("end_to_end", [])],
            "graphs": {g: r.get("passed") for g, r in report.get("graphs", {}).items()},
            "pruning": manifest.get("pruning"), "k": manifest.get("k")}


def machine(load_before) -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = {}
    try:
        import torch

        if torch.cuda.is_available():
            gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    except ImportError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(), **gpu,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# --- rows, checks, targets ------------------------------------------------------------------------------
def make_rows(results: dict, dims: dict, floors: dict, s: Settings, ffn_layers: list[int]) -> list[dict]:
    rate, bandwidth = floors["matmul_flops_per_s"], floors["copy_bytes_per_s"]
    rows = []
    for peer, result in results.items():
        runner, label, _, _ = PEERS[peer]
        for visual in s.visual:
            row = {"peer": peer, "label": label, "visual": visual, "keep": visual if peer in ("hf_sdpa", "ort_unpruned", "genai") else s.keep,
                   "ffn": "affine" if peer.endswith("_affine") else "none"}
            if "failed" in result:
                rows.append({**row, "failed": result["failed"]})
                continue
            entry = result["visual"][str(visual)]
            work = peer_work(dims, peer, visual, s, ffn_layers, s.batch)
            row.update({phase: entry[phase] for phase in PHASES})
            row["flops"] = {k: v for k, v in work.items() if k != "decode_bytes_per_token"}
            row["decode_bytes_per_token"] = work["decode_bytes_per_token"]
            row["flop_floor_ms"] = {k: v / rate * 1e3 for k, v in row["flops"].items()}
            row["memory_floor_ms"] = {"decode_per_token": work["decode_bytes_per_token"] / bandwidth * 1e3}
            row["ratio_to_flop_floor"] = {}
            for phase in PHASES:
                key = phase[: -len("_ms")]
                floor = row["flop_floor_ms"][key]
                if entry[phase] is not None and floor > 0:
                    row["ratio_to_flop_floor"][key] = entry[phase]["median"] / floor
            if entry["decode_per_token_ms"] is not None:
                both = max(row["flop_floor_ms"]["decode_per_token"], row["memory_floor_ms"]["decode_per_token"])
                row["ratio_to_decode_floor"] = entry["decode_per_token_ms"]["median"] / both
            row["peak_rss_bytes"] = result["process_peak_rss_bytes"]  # the peer's process, model load included
            row["run_peak_rss_bytes"] = entry["peak_rss_bytes"]  # from the end of loading to the end of the runs
            row["load_seconds"] = result["load_seconds"]
            row["threads"] = result["threads"]
            row["load_average"] = result.get("load_average")
            rows.append(row)
    return rows


def make_checks(results: dict, s: Settings, dims: dict | None = None) -> list[dict]:
    """Each engine against its eager reference on the benchmark's own inputs: kept visual indices
    equal, greedy tokens equal (fp32; reduced precision is reported, not required). GenAI against
    the HF decoder given the same text-only ids."""
    checks = []

    def outputs(peer, visual, key):
        result = results.get(peer)
        if not result or "failed" in result:
            return None
        return result["visual"][str(visual)].get(key)

    pairs = [(p, PEERS[p][3], "tokens") for p in ENGINE_PEERS] + [("genai", "hf_sdpa", "text_only_tokens")]
    for peer, reference, reference_tokens in pairs:
        if peer not in results or reference not in results:
            continue
        for visual in s.visual:
            tokens, expected = outputs(peer, visual, "tokens"), outputs(reference, visual, reference_tokens)
            if tokens is None or expected is None:
                checks.append({"peer": peer, "against": reference, "visual": visual, "passed": False,
                               "error": "a peer failed"})
                continue
            steps = min(len(tokens[0]), len(expected[0]))
            agree = sum(a == b for row, ref in zip(tokens, expected) for a, b in zip(row[:steps], ref[:steps]))
            check = {"peer": peer, "against": reference, "visual": visual,
                     "token_agreement": agree / (steps * len(tokens)) if steps else 0.0}
            keep, expected_keep = outputs(peer, visual, "keep_indices"), outputs(reference, visual, "keep_indices")
            if peer != "genai" and expected_keep is not None:
                check["keep_equal"] = keep == expected_keep
            elif peer == "ort_unpruned":  # every candidate kept, in order
                layout = (dims or {}).get("layout_tokens_per_image", 0) * visual // (dims or {}).get(
                    "visual_tokens_per_image", visual)
                candidates = visual - layout
                check["keep_equal"] = keep == [list(range(candidates))] * s.batch
            check["passed"] = check.get("keep_equal", True) and (check["token_agreement"] == 1.0 or s.dtype != "fp32")
            checks.append(check)
    return checks


def _median(rows: list[dict], peer: str, visual: int, phase: str):
    for row in rows:
        if row["peer"] == peer and row["visual"] == visual and row.get(phase):
            return row[phase]["median"]
    return None


def make_targets(rows: list[dict], s: Settings) -> list[dict]:
    """The speed targets of a CAPA engine, per visual-token count, with whether each is met."""
    targets = []
    for visual in s.visual:
        hf = _median(rows, "hf_sdpa", visual, "prefill_ms")
        genai_decode = _median(rows, "genai", visual, "decode_per_token_ms")
        for peer in CAPA_ENGINES:
            prefill = _median(rows, peer, visual, "prefill_ms")
            if prefill is None:
                continue
            row = next(r for r in rows if r["peer"] == peer and r["visual"] == visual)
            if hf is not None:
                required = speedup_target(visual)
                value = hf / prefill
                targets.append({"peer": peer, "visual": visual, "target": "prefill speed-up over HF SDPA unpruned",
                                "value": value, "required": f">= {required}" if required else None,
                                "met": value >= required if required else None})
            ratio = row["ratio_to_flop_floor"].get("prefill")
            targets.append({"peer": peer, "visual": visual, "target": "prefill / its FLOP floor", "value": ratio,
                            "required": f"<= {FLOOR_TARGET}", "met": ratio <= FLOOR_TARGET})
            decode = _median(rows, peer, visual, "decode_per_token_ms")
            if genai_decode is not None and decode is not None:
                targets.append({"peer": peer, "visual": visual, "target": "decode ms/token vs ONNX Runtime GenAI",
                                "value": decode / genai_decode, "required": "<= 1.0",
                                "met": decode <= genai_decode})
    return targets


# --- output ------------------------------------------------------------------------------------------------
def _ms(stats) -> str:
    return "-" if not stats else f"{stats['median']:.1f}"


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_table(report: dict) -> str:
    """The terminal summary: one line per peer and visual-token count."""
    lines = [f"{'peer':<20} {'visual':>6} {'keep':>5} {'vision':>8} {'prefill':>9} {'TTFT':>9} {'decode/tok':>10} "
             f"{'prefill/floor':>13} {'peak RSS GiB':>12}"]
    for r in report["rows"]:
        if "failed" in r:
            lines.append(f"{r['peer']:<20} {r['visual']:>6} FAILED {r['failed'][:80]}")
            continue
        ratio = r["ratio_to_flop_floor"].get("prefill")
        lines.append(f"{r['peer']:<20} {r['visual']:>6} {r['keep']:>5} {_ms(r['vision_ms']):>8} {_ms(r['prefill_ms']):>9} "
                     f"{_ms(r['time_to_first_token_ms']):>9} {_ms(r['decode_per_token_ms']):>10} "
                     f"{'-' if ratio is None else f'{ratio:.2f}':>13} {_gib(r['peak_rss_bytes']):>12}")
    for t in report["targets"]:
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"target {t['peer']} @ {t['visual']}: {t['target']} = {t['value']:.2f} "
                     f"(required {t['required'] or 'none'}): {verdict}")
    failed = [c for c in report["checks"] if not c["passed"]]
    lines.append(f"checks: {len(report['checks']) - len(failed)}/{len(report['checks'])} passed"
                 + "".join(f"; FAILED {c['peer']} vs {c['against']} @ {c['visual']}" for c in failed))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The BENCHMARKS.md section of one run: settings, machine, versions, timings with floors,
    targets, build memory, checks, and the CAPA engines' prefill profile."""
    s, m, v = report["settings"], report["machine"], report["versions"]
    floors = report["floors"]
    quiet = is_quiet(m, s.get("threads"))
    out = [f"### {s['size']}, {s['dtype']}, batch {s['batch']}: {report['date'][:10]} on {m['cpu']} "
           f"({m['cores']} cores, {s['threads']} threads)", ""]
    if s["smoke"]:
        out += ["*Smoke run: checks the path; its times say nothing about speed.*", ""]
    if not quiet:
        out += [f"*Measured on a shared, loaded machine ({m['cores']} cores; 1-minute load average "
                f"{m['load_average_before'][0]} before the run, {m['load_average_after'][0]} after it, per peer in "
                f"the table): the peers competed with other work for the cores, and the floors were measured at "
                f"other moments than the peers, so ratios to the floors can fall below 1. A development run, not a "
                f"quiet-machine result.*", ""]
    out += ["Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
            f"Prompt: BOS + N visual tokens ({report['dims']['visual_tokens_per_image']} per picture) + "
            f"{s['text_tokens']} text tokens; keep {s['keep']} after layer {s['prune_layer']}; affine FFN in layers "
            f"{report['ffn_layers'][0]}-{report['ffn_layers'][-1]}; {s['new_tokens']} new tokens; medians of "
            f"{s['repeats']} runs after {s['warmup']} warm-up. Floors measured in the same run: matmul "
            f"{floors['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({s['dtype']}, {floors['threads']} threads), "
            f"copy {floors['copy_bytes_per_s'] / 1e9:.1f} GB/s. Run took {report['seconds'] / 60:.1f} min.", ""]
    out += ["| visual | runtime | vision ms | prefill ms | prefill x HF | prefill / FLOP floor | TTFT ms | "
            "decode ms/token | decode / floor | peak RSS GiB | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = report["rows"]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['visual']} | {r['label']} | failed: {r['failed'][:60]} ||||||||")
            continue
        hf = _median(rows, "hf_sdpa", r["visual"], "prefill_ms")
        speedup = f"{hf / r['prefill_ms']['median']:.2f}" if hf and r["prefill_ms"] else "-"
        ratio = r["ratio_to_flop_floor"].get("prefill")
        decode_ratio = r.get("ratio_to_decode_floor")
        out.append(f"| {r['visual']} | {r['label']} | {_ms(r['vision_ms'])} | {_ms(r['prefill_ms'])} | {speedup} | "
                   f"{'-' if ratio is None else f'{ratio:.2f}'} | {_ms(r['time_to_first_token_ms'])} | "
                   f"{_ms(r['decode_per_token_ms'])} | {'-' if decode_ratio is None else f'{decode_ratio:.2f}'} | "
                   f"{_gib(r['peak_rss_bytes'])} | {_load(r.get('load_average'))} |")
    for peer, reason in report.get("skipped", {}).items():
        out.append(f"| | {PEERS[peer][1]} | skipped: {reason} |||||||||")
    out += ["", "| target | visual | engine | value | required | |", "|---|---|---|---|---|---|"]
    for t in report["targets"]:
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "**missed**")
        out.append(f"| {t['target']} | {t['visual']} | {t['peer']} | {t['value']:.2f} | {t['required'] or '-'} | {verdict} |")
    out += ["", "| command | seconds | peak RSS GiB | x weights |", "|---|---|---|---|"]
    for name, entry in report["memory"].items():
        reused = f" (from {entry['reused_from'][:10]})" if entry.get("reused_from") else ""
        ratio = entry["ratio_to_weights"]
        out.append(f"| {name}{reused} | {entry['seconds']:.0f} | {_gib(entry['peak_rss_bytes'])} | "
                   f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    out += ["", f"Weights: {report['dims']['checkpoint_weight_bytes'] / 2**30:.2f} GiB ({s['dtype']})."]
    checks = report["checks"]
    failed = [c for c in checks if not c["passed"]]
    engines = ", ".join(f"{n} {'passed' if v['passed'] else 'FAILED'}" for n, v in report["validation"].items())
    out += ["", f"Validation: build (Polygraphy vs CapaModel): {engines or 'no engines'}; on the benchmark's inputs "
                f"(kept indices and greedy tokens vs the eager reference): {len(checks) - len(failed)}/{len(checks)} "
                f"passed" + "".join(f"; **failed** {c['peer']} vs {c['against']} at {c['visual']}" for c in failed) + "."]
    for peer, profile in report["profiles"].items():
        if "failed" in profile:
            out += ["", f"Profile of {peer}: failed ({profile['failed'][:100]})."]
            continue
        for visual, summary in profile["profiles"].items():
            ops = ", ".join(f"{o['op']} {o['ms']:.0f} ms ({o['share']:.0%})" for o in summary["by_op_type"][:8])
            nodes = ", ".join(f"{n['node']} {n['ms']:.0f} ms" for n in summary["slowest_nodes"][:5])
            out += ["", f"Profile of {peer}'s prefill at {visual} visual tokens (ONNX Runtime, the "
                        f"session's run {summary.get('runs', 1)}, {summary['model_run_ms']:.0f} ms): {ops}. Slowest nodes: {nodes}."]
    return "\n".join(out) + "\n"


def is_quiet(machine_info: dict, threads: int | None = None) -> bool:
    """A run counts as a result only when nothing else ran: the 1-minute load average below half
    the cores when it started, and when it ended no more than the run's own threads (+ 0.5): the
    last peer's threads are still in the 1-minute average then, so the load after a quiet run is
    about `threads`, not 0."""
    cores = machine_info["cores"] or 1
    own = threads if threads is not None else cores
    return machine_info["load_average_before"][0] < 0.5 * cores and machine_info["load_average_after"][0] <= own + 0.5


def _load(load) -> str:
    """1-minute load average while a peer ran: before/after it, or the mean (min-max) of samples."""
    if not load:
        return "-"
    if "mean" in load:
        return f"{load['mean']:.1f} ({load['min']:.1f}-{load['max']:.1f})"
    return f"{load['before'][0]:.1f}/{load['after'][0]:.1f}"


def plot(report: dict, path: Path) -> Path:
    """Prefill and decode per token of every peer, one panel pair per visual-token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    visuals = report["settings"]["visual"]
    fig, axes = plt.subplots(len(visuals), 2, figsize=(11, 3.2 * len(visuals)), squeeze=False)
    for row_axes, visual in zip(axes, visuals):
        rows = [r for r in report["rows"] if r["visual"] == visual and "failed" not in r]
        for ax, phase, title in ((row_axes[0], "prefill_ms", "prefill"), (row_axes[1], "decode_per_token_ms",
                                                                          "decode per token")):
            shown = [r for r in rows if r.get(phase)]
            names = [r["peer"] for r in shown]
            values = [r[phase]["median"] for r in shown]
            bars = ax.barh(names, values, color=["tab:red" if n in CAPA_ENGINES else "tab:gray" for n in names])
            for bar, r in zip(bars, shown):
                floor = r["flop_floor_ms"]["prefill" if phase == "prefill_ms" else "decode_per_token"]
                ax.plot([floor, floor], [bar.get_y(), bar.get_y() + bar.get_height()], color="black", lw=1)
            ax.set_title(f"{title}, {visual} visual tokens (black: FLOP floor)", fontsize=9)
            ax.set_xlabel("ms (median)")
            ax.invert_yaxis()
    s = report["settings"]
    fig.suptitle(f"capa-export bench: {s['size']} {s['dtype']} batch {s['batch']}, {report['machine']['cpu']}, "
                 f"{report['date'][:10]}" + ("" if is_quiet(report["machine"], report["settings"].get("threads")) else
                                              " (shared, loaded machine: a development run)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MARK_BEGIN = "<!-- capa-export bench {key}: begin -->"
MARK_END = "<!-- capa-export bench {key}: end -->"


def update_benchmarks(path: str | Path, report: dict, json_path: Path) -> Path:
    """Replace (or append) this size's section in a Markdown file, between markers."""
    path = Path(path)
    key = f"{report['settings']['size']}-{report['settings']['dtype']}-b{report['settings']['batch']}"
    begin, end = MARK_BEGIN.format(key=key), MARK_END.format(key=key)
    section = f"{begin}\n{format_markdown(report)}\nJSON: `{json_path}`, plot: `{json_path.with_suffix('.png')}`.\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def save(report: dict, out: str | Path) -> Path:
    """JSON, PNG and Markdown side by side."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(format_markdown(report))
    return out


# --- kept for bench/bench_contrib_topk.py ------------------------------------------------------------------
class Timer:
    """Median and 10th / 90th percentiles of `repeats` timed calls after `warmup` untimed ones
    (CUDA events on a GPU, perf_counter on CPU)."""

    def __init__(self, device: str, warmup: int, repeats: int):
        self.cuda = device.startswith("cuda")
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn) -> dict:
        import torch

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
