"""`capa-export export`: a CAPA model -> vision / embed / prefill / decode ONNX graphs.

All graphs keep their weights in one external-data file, `weights.data`, each distinct tensor
stored once (the prefill and decode decoders reference the same bytes at the same offsets; ONNX
allows several models to share one external file). Every graph passes `onnx.checker` (full
check) and shape inference; `export.json` describes what was exported, from what, and how.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from .. import __version__
from ..artifacts import replace_directory, sha256_file, write_json
from ..capa.calibration import builtin_samples, encode
from ..capa.model import CapaModel, apply_capa
from ..errors import CapaError
from ..models import adapter_for, cast_model, parse_dtype
from .graphs import PRUNING_LOWERINGS, DecodeGraph, EmbedGraph, PrefillGraph, VisionGraph

GRAPHS = ("vision", "embed", "prefill", "decode")
WEIGHTS_FILE = "weights.data"
MANIFEST = "export.json"
OPSET = 18
# Tensors smaller than this stay inline in their graph (scalars, shapes): not worth an offset.
INLINE_BYTES = 1024
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def graph_io_names(num_layers: int, num_segments: int) -> dict[str, tuple[list[str], list[str]]]:
    kv = lambda prefix: [f"{prefix}.{i}.{t}" for i in range(num_layers) for t in ("key", "value")]  # noqa: E731
    masks = [f"segment_mask.{s}" for s in range(num_segments)]
    return {
        "vision": (["pixel_values"], ["image_features"]),
        "embed": (["input_ids"], ["inputs_embeds"]),
        "prefill": (["inputs_embeds", "attention_mask", "position_ids", "visual_positions"],
                    ["logits", "keep_indices", *masks, *kv("present")]),
        "decode": (["inputs_embeds", "position_ids", *[f"past_{m}" for m in masks], *kv("past")],
                   ["logits", *kv("present")]),
    }


def example_inputs(capa: CapaModel, processor, batch: int = 2):
    """Real inputs from a built-in picture (batch 2, so no dimension is specialised to 1)."""
    adapter = capa.adapter
    sample = builtin_samples(1, seed=3)[0]
    enc = encode(adapter, processor, sample)
    ids = enc["input_ids"].repeat(batch, 1)
    pixels = enc["pixel_values"].repeat(batch, 1, 1, 1)
    mask = enc["attention_mask"].repeat(batch, 1)
    with torch.no_grad():
        embeds = capa.embed(ids, pixels)
        prefill = capa(ids, pixel_values=pixels, attention_mask=mask, use_cache=True, last_logits_only=True)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "inputs_embeds": embeds,
            "visual_positions": capa.visual_slots(ids), "position_ids": capa.adapter.default_position_ids(ids, mask),
            "cache": prefill.past_key_values}


def _export_one(module, args, path: Path, input_names, output_names, dynamic_shapes, quiet: bool):
    sink = io.StringIO()
    module.eval()
    quiet_logs = logging.getLogger("torch.onnx")
    level = quiet_logs.level
    if quiet:  # the exporter's own chatter (and notes about torchvision ops we never use)
        quiet_logs.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), \
            (contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()):
        if quiet:
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
        program = torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET,
                                    external_data=True, verbose=False)
    quiet_logs.setLevel(level)
    del program


def export_graphs(capa: CapaModel, processor, directory: Path, pruning: str, progress: bool = True,
                  graphs=GRAPHS) -> None:
    adapter = capa.adapter
    ex = example_inputs(capa, processor)
    cache = ex["cache"]
    segments = len(cache.segment_masks)
    names = graph_io_names(adapter.num_layers, segments)
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=256)
    images = dim("images", min=1, max=64)
    seq = dim("sequence", min=8, max=16384)
    tokens = dim("tokens", min=1, max=16384)  # embed serves prompts and single decode tokens
    visual = dim("visual_tokens", min=1, max=16384)
    new = dim("new_tokens", min=1, max=4096)
    past = [dim(f"past_segment{s}", min=1, max=16384) for s in range(segments)]
    layer_segment = capa.layer_segments()
    steps = 2
    device = ex["input_ids"].device
    new_embeds = adapter.embed_tokens(torch.full((ex["input_ids"].shape[0], steps), 5, dtype=torch.long,
                                                 device=device)).detach()
    new_positions = cache.next_position[:, None] + torch.arange(steps, device=device)[None, :]
    kv_shapes = [{0: batch, 2: past[layer_segment[i // 2]]} for i in range(2 * adapter.num_layers)]
    jobs = {
        "vision": (VisionGraph(capa), (ex["pixel_values"],), ({0: images},)),
        "embed": (EmbedGraph(capa), (ex["input_ids"],), ({0: batch, 1: tokens},)),
        "prefill": (PrefillGraph(capa, pruning),
                    (ex["inputs_embeds"], ex["attention_mask"], ex["position_ids"], ex["visual_positions"]),
                    ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: visual})),
        "decode": (DecodeGraph(capa),
                   (new_embeds, new_positions, list(cache.segment_masks),
                    [t for pair in zip(cache.keys, cache.values) for t in pair]),
                   ({0: batch, 1: new}, {0: batch, 1: new}, [{0: batch, 1: p} for p in past], kv_shapes)),
    }
    from tqdm import tqdm

    for name in tqdm(graphs, desc="exporting", unit="graph", disable=not progress):
        module, args, shapes = jobs[name]
        inputs, outputs = names[name]
        _export_one(module, args, directory / f"{name}.onnx", inputs, outputs, shapes, quiet=True)


def share_weights(directory: Path, graphs=GRAPHS) -> dict:
    """Move every initializer of every graph into one `weights.data`, each distinct tensor once.

    Returns statistics: bytes referenced by the graphs vs bytes stored."""
    stored: dict[str, tuple[int, int]] = {}
    referenced = 0
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    with open(tmp, "wb") as data:
        for name in graphs:
            path = directory / f"{name}.onnx"
            model = onnx.load(str(path), load_external_data=True)
            for tensor in model.graph.initializer:
                raw = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
                if len(raw) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(raw).hexdigest() + f":{tensor.data_type}"
                if key not in stored:
                    offset = data.tell()
                    pad = (-offset) % 64  # aligned offsets let runtimes memory-map tensors
                    data.write(b"\0" * pad)
                    stored[key] = (offset + pad, len(raw))
                    data.write(raw)
                offset, length = stored[key]
                referenced += length
                tensor.ClearField("raw_data")
                del tensor.float_data[:], tensor.int32_data[:], tensor.int64_data[:], tensor.double_data[:]
                del tensor.external_data[:]
                for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(path))
    tmp.rename(directory / WEIGHTS_FILE)
    for leftover in directory.iterdir():  # the exporter's own per-graph data files, now unused
        if leftover.suffix != ".onnx" and leftover.name != WEIGHTS_FILE:
            leftover.unlink()
    return {"bytes_referenced": referenced, "bytes_stored": (directory / WEIGHTS_FILE).stat().st_size,
            "distinct_tensors": len(stored)}


def check_graphs(directory: Path, graphs=GRAPHS) -> dict:
    """onnx.checker (full) and shape inference on every graph; a per-graph summary."""
    summary = {}
    for name in graphs:
        path = directory / f"{name}.onnx"
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise CapaError(f"exported {path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from None
        inferred = onnx.shape_inference.infer_shapes_path  # writes in place; we keep a copy check only
        tmp = directory / f".{name}.inferred.onnx"
        inferred(str(path), str(tmp))
        tmp.unlink()
        model = onnx.load(str(path), load_external_data=False)
        parameters = sum(int(torch.tensor(list(t.dims)).prod()) if t.dims else 1 for t in model.graph.initializer)
        summary[name] = {
            "nodes": len(model.graph.node),
            "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
            "parameters": parameters,
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output],
        }
    return summary


def export_model(model, processor, config, ffn, out_dir: str | Path, *, dtype="fp32", pruning: str = "plugin",
                 model_name: str = "", progress: bool = True, graphs=GRAPHS) -> Path:
    """Export the CAPA model to `out_dir` (written under a temporary name, renamed when complete)."""
    if pruning not in PRUNING_LOWERINGS:
        raise CapaError(f"pruning lowering {pruning!r} is unknown; expected one of {', '.join(PRUNING_LOWERINGS)}")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype not in DTYPE_NAMES:
        raise CapaError(f"dtype {dtype!r} cannot be exported; expected fp32, fp16 or bf16")
    if next(model.parameters()).dtype != torch_dtype:
        model = cast_model(copy.deepcopy(model), torch_dtype)  # the caller's model stays as it was
    if ffn is not None:
        ffn = ffn.cast(torch_dtype)  # folded weights in the graph's dtype: plain MatMul + Add, no Cast
    capa = apply_capa(model, config, ffn)
    adapter = adapter_for(model)
    start = time.perf_counter()

    def write(tmp: Path):
        export_graphs(capa, processor, tmp, pruning, progress, graphs)
        sharing = share_weights(tmp, graphs)
        summary = check_graphs(tmp, graphs)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
                 if p.is_file()}
        fingerprint = {k: v for k, v in adapter.fingerprint().items() if k != "weight_sample"}
        write_json(tmp / MANIFEST, {
            "artifact": "capa-onnx",
            "tool": {"name": "capa-export", "version": __version__},
            "libraries": library_versions(),
            "model": {"name": model_name or fingerprint["name_or_path"], **fingerprint,
                      "image_token_id": adapter.image_token_id, "vocab_size": adapter.vocab_size,
                      "num_visual_tokens_per_image": adapter.num_visual_tokens_per_image()},
            "capa_config": config.to_dict(),
            "ffn_layers": capa.ffn_layers,
            "dtype": DTYPE_NAMES[torch_dtype],
            "pruning": pruning,
            "k": config.prune[-1][1] if config.prune else None,
            "layer_segment": capa.layer_segments(),
            "opset": OPSET,
            "graphs": summary,
            "weights": sharing,
            "files": files,
            "seconds": round(time.perf_counter() - start, 1),
        })

    return replace_directory(out_dir, write)


def library_versions() -> dict:
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def format_summary(manifest: dict) -> str:
    rows = [f"{'graph':<8} {'nodes':>6} {'parameters':>12}  main ops"]
    for name, info in manifest["graphs"].items():
        ops = ", ".join(f"{op} {n}" for op, n in list(info["ops"].items())[:6])
        rows.append(f"{name:<8} {info['nodes']:>6} {info['parameters']:>12,}  {ops}")
        if name == "prefill":
            special = {op: n for op, n in info["ops"].items() if op in ("CapaContribTopK", "TopK")}
            rows.append(f"{'':<8} pruning: {manifest['pruning']} ({special}); k = {manifest['k']}; "
                        f"FFN approximated in layers {manifest['ffn_layers'] or 'none'}")
    weights = manifest["weights"]
    rows.append(f"weights.data: {weights['bytes_stored'] / 2**20:.1f} MiB stored for "
                f"{weights['bytes_referenced'] / 2**20:.1f} MiB referenced ({weights['distinct_tensors']} tensors)")
    return "\n".join(rows)
