"""`capa-export export`: a CAPA model -> vision / embed / prefill / decode ONNX graphs.

All graphs keep their weights in one external-data file, `weights.data`, each distinct tensor
stored once (the prefill and decode decoders reference the same bytes at the same offsets; ONNX
allows several models to share one external file). Every graph passes `onnx.checker` (full
check) and shape inference; `export.json` describes what was exported, from what, and how.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import io
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
import onnx.inliner
import torch

from ..artifacts import replace_directory, sha256_file
from ..contract import GRAPHS, GraphContract
from ..dtypes import float_type
from ..errors import CapaError
from ..inputs import builtin_samples
from ..manifest import ONNX, write_manifest
from ..method.capa_model import CapaModel, apply_capa
from ..models import adapter_for, cast_model
from ..ops.onnx_function import attach_function
from ..ops.spec import SPEC
from .graphs import graph_inputs, graph_modules, pruning_lowering

WEIGHTS_FILE = "weights.data"
#: 23: the standard Attention op (GQA, past/present KV, post-softmax probabilities)
OPSET = 23
ATTENTION_FORMS = ("fused", "explicit")
#: most query blocks of a fused attention (`method.capa_model.blocked_attention`): each block is one
#: Attention node per layer before pruning
MAX_ATTENTION_BLOCKS = 64


def check_attention_blocks(blocks, attention: str = "fused", where: str = "attention_blocks") -> None:
    """Query blocks of the prefill's fused attention before pruning: 1 (one Attention op per layer)
    to MAX_ATTENTION_BLOCKS; more than 1 only with fused attention (the explicit form has no op to split)."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= MAX_ATTENTION_BLOCKS:
        raise CapaError(f"{where} = {blocks!r} must be an integer from 1 to {MAX_ATTENTION_BLOCKS}")
    if blocks > 1 and attention != "fused":
        raise CapaError(f"{where} = {blocks} needs fused attention (got attention {attention!r}); use 1 or "
                        f"attention = \"fused\"")
# Tensors smaller than this stay inline in their graph (scalars, shapes): not worth an offset.
INLINE_BYTES = 1024
#: example batch size: 2, so that no dimension is specialised to 1 when tracing
EXAMPLE_BATCH = 2
EXAMPLE_DECODE_STEPS = 2


def example_inputs(capa: CapaModel, processor) -> dict[str, dict]:
    """Every graph's example inputs, from a built-in picture (batch 2, a decode step of 2 tokens)."""
    sample = builtin_samples(1, seed=3)[0]
    batch = capa.family.encode(processor, [sample.image] * EXAMPLE_BATCH, [sample.question] * EXAMPLE_BATCH)
    device = capa.device
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens = torch.full((EXAMPLE_BATCH, EXAMPLE_DECODE_STEPS), 5, dtype=torch.long, device=device)
    return graph_inputs(capa, batch, decode_tokens=tokens)


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
    _forget_rewriter_matches()


def _forget_rewriter_matches() -> None:
    """Drop the exported graph that onnxscript's rewrite rules keep after torch.onnx.export returns.

    Its pattern rules are module-level objects whose matcher remembers the last graph it matched
    (`SimplePatternMatcher._graph`, onnxscript 0.7), and that graph wraps the model's parameters
    (TorchTensor): the model's weights stayed in memory after the model was deleted, ~2.7 GB on the
    mid size, and a build's later stages added to them. Found by walking the referrers of a
    parameter still alive after `del model`; tests/test_engine.py checks they are gone."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for name in ("_graph", "_tracer", "_match"):
                obj.__dict__.pop(name, None)
            obj._current_node = None


def export_graphs(capa: CapaModel, processor, directory: Path, pruning: str, progress: bool = True,
                  graphs=GRAPHS) -> GraphContract:
    """Trace each graph module with example inputs into directory/<graph>.onnx; names and dynamic
    dimensions come from the family's graph contract, which is returned."""
    contract = capa.family.graph_contract(capa.layer_segments())
    examples = example_inputs(capa, processor)
    modules = graph_modules(capa, pruning)
    from ..logs import Progress

    steps = Progress(graphs, "exporting", "graph", enabled=progress)
    for name in steps:
        spec = contract[name]
        path = directory / f"{name}.onnx"
        with steps.alive(f"tracing {name}.onnx"):  # the prefill graph takes minutes on a real model
            _export_one(modules[name], spec.forward_arguments(examples[name]), path, spec.input_names,
                        spec.output_names, spec.dynamic_shapes(), quiet=True)
        if name == "prefill":
            place_selection(path, pruning)
    return contract


def place_selection(path: Path, pruning: str) -> None:
    """Give the prefill graph's CapaContribTopK node its local function, or inline it."""
    model = attach_function(onnx.load(str(path), load_external_data=False))
    if pruning == "inline":
        model = onnx.inliner.inline_local_functions(model)
    onnx.save(model, str(path))


def _tensor_bytes(tensor: onnx.TensorProto, directory: Path) -> bytes:
    """One initializer's raw bytes: inline, or read from its external-data file (only this tensor)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
    info = {entry.key: entry.value for entry in tensor.external_data}
    with open(directory / info["location"], "rb") as source:
        source.seek(int(info.get("offset", 0)))
        return source.read(int(info["length"])) if "length" in info else source.read()


def share_weights(directory: Path, graphs=GRAPHS) -> dict:
    """Move every initializer of every graph into one `weights.data`, each distinct tensor once.

    Streams one tensor at a time (the graphs are read without their external data), so memory stays
    at the largest tensor, not a graph's weights. Returns statistics: bytes referenced by the graphs
    vs bytes stored."""
    stored: dict[str, tuple[int, int]] = {}
    referenced = 0
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    with open(tmp, "wb") as data:
        for name in graphs:
            path = directory / f"{name}.onnx"
            model = onnx.load(str(path), load_external_data=False)
            for tensor in model.graph.initializer:
                raw = _tensor_bytes(tensor, directory)
                if len(raw) < INLINE_BYTES:
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # small: back inline
                        del tensor.external_data[:]
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        tensor.raw_data = raw
                    continue
                key = hashlib.sha256(raw).hexdigest() + f":{tensor.data_type}"
                if key not in stored:
                    offset = data.tell()
                    pad = (-offset) % 64  # aligned offsets let runtimes memory-map tensors
                    data.write(b"\0" * pad)
                    stored[key] = (offset + pad, len(raw))
                    data.write(raw)
                del raw
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
            "functions": [f"{f.domain}::{f.name}" for f in model.functions],
        }
    return summary


def export_model(model, processor, config, ffn, out_dir: str | Path, *, dtype="fp32", pruning: str = "function",
                 attention: str = "fused", attention_blocks: int = 1, model_name: str = "", progress: bool = True,
                 graphs=GRAPHS) -> Path:
    """Export the CAPA model to `out_dir` (written under a temporary name, renamed when complete).

    attention: "fused" writes each layer's attention as one ONNX Attention op (opset 23: ONNX
    Runtime >= 1.23, TensorRT >= 10.14 run it with their own kernels); "explicit" writes the
    MatMul / Softmax / MatMul of the reference, for runtimes without it."""
    pruning = pruning_lowering(pruning)
    if attention not in ATTENTION_FORMS:
        raise CapaError(f"attention {attention!r} is unknown; expected one of {', '.join(ATTENTION_FORMS)}")
    check_attention_blocks(attention_blocks, attention)
    graph_type = float_type(dtype)
    if next(model.parameters()).dtype != graph_type.torch:
        model = cast_model(copy.deepcopy(model), graph_type.torch)  # the caller's model stays as it was
    if ffn is not None:
        ffn = ffn.cast(graph_type.torch)  # folded weights in the graph's dtype: plain MatMul + Add, no Cast
    capa = apply_capa(model, config, ffn)
    capa.fused_attention = attention == "fused"
    capa.attention_blocks = attention_blocks
    adapter = adapter_for(model)
    start = time.perf_counter()

    def write(tmp: Path):
        contract = export_graphs(capa, processor, tmp, pruning, progress, graphs)
        sharing = share_weights(tmp, graphs)
        summary = check_graphs(tmp, graphs)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
                 if p.is_file()}
        fingerprint = {k: v for k, v in adapter.fingerprint().items() if k != "weight_sample"}
        write_manifest(tmp, ONNX, {
            "model": {"name": model_name or fingerprint["name_or_path"], **fingerprint, **adapter.describe()},
            "capa_config": config.to_dict(),
            "ffn_layers": capa.ffn_layers,
            "dtype": graph_type.name,
            "pruning": pruning,
            "attention": attention,
            "attention_blocks": attention_blocks,
            "k": config.prune[-1][1] if config.prune else None,
            "layer_segment": capa.layer_segments(),
            "graph_contract": contract.to_dict(),
            "opset": OPSET,
            "graphs": summary,
            "weights": sharing,
            "files": files,
            "seconds": round(time.perf_counter() - start, 1),
        })

    return replace_directory(out_dir, write)


def format_summary(manifest: dict) -> str:
    rows = [f"{'graph':<8} {'nodes':>6} {'parameters':>12}  main ops"]
    for name, info in manifest["graphs"].items():
        ops = ", ".join(f"{op} {n}" for op, n in list(info["ops"].items())[:6])
        rows.append(f"{name:<8} {info['nodes']:>6} {info['parameters']:>12,}  {ops}")
        if name == "prefill":
            special = {op: n for op, n in info["ops"].items() if op in (SPEC.name, "TopK")}
            nodes = ", ".join(f"{n} {op}" for op, n in special.items()) or "no selection node"
            rows.append(f"{'':<8} pruning: {manifest['pruning']} ({nodes}); "
                        f"k = {manifest['k']}{' of N' if isinstance(manifest['k'], float) else ''}; "
                        f"FFN approximated in layers {manifest['ffn_layers'] or 'none'}")
    weights = manifest["weights"]
    rows.append(f"weights.data: {weights['bytes_stored'] / 2**20:.1f} MiB stored for "
                f"{weights['bytes_referenced'] / 2**20:.1f} MiB referenced ({weights['distinct_tensors']} tensors)")
    return "\n".join(rows)
