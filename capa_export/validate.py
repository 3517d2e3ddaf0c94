"""`capa-export validate`: an engine against the PyTorch CapaModel, with Polygraphy.

1. Graph by graph: Polygraphy's Comparator runs the engine's runner (ONNX Runtime or TensorRT) and
   a runner of the fp32 CapaModel (the same graph modules the exporter traced, with the reference
   token selection) on the same feeds, and compares every output within the dtype's tolerance.
2. End to end: greedy generation with the engine vs the CapaModel: token agreement (must be 100%
   in fp32), and, for information, agreement with the unpruned model.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .capa.model import CapaModel
from .export.graphs import DecodeGraph, EmbedGraph, PrefillGraph, VisionGraph

# (rtol, atol) per engine dtype; CAPA.md / the issue: fp32 ~1e-4, fp16/bf16 ~1e-2 relative
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 2e-2), "bf16": (2e-2, 5e-2)}
NUMPY_FLOAT = {"fp32": np.float32, "fp16": np.float16}


class CapaModelRunner(BaseRunner):
    """A Polygraphy runner over one graph module of the PyTorch reference (fp32, CPU)."""

    def __init__(self, graph: str, module, input_names, output_names, input_metadata: TensorMetadata):
        super().__init__(name=f"capa-pytorch:{graph}")
        self.graph, self.module = graph, module
        self.input_names, self.output_names, self.metadata = input_names, output_names, input_metadata

    def get_input_metadata_impl(self):
        return self.metadata

    def _arguments(self, feed):
        tensors = {}
        for name in self.input_names:
            array = np.asarray(feed[name])
            tensor = torch.from_numpy(array.astype(np.float32) if array.dtype.kind == "f" else array)
            tensors[name] = tensor
        if self.graph != "decode":
            return [tensors[n] for n in self.input_names]
        masks = [tensors[n] for n in self.input_names if n.startswith("past_segment_mask")]
        past = [tensors[n] for n in self.input_names if n.startswith("past.")]
        return [tensors["inputs_embeds"], tensors["position_ids"], masks, past]

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.module(*self._arguments(feed_dict))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, out.detach().float().numpy() if out.is_floating_point() else out.numpy())
                           for name, out in zip(self.output_names, outputs))


def reference_modules(capa: CapaModel) -> dict:
    return {"vision": VisionGraph(capa), "embed": EmbedGraph(capa), "prefill": PrefillGraph(capa, "reference"),
            "decode": DecodeGraph(capa)}


def graph_feeds(capa: CapaModel, batch: dict, dtype: str) -> dict[str, dict]:
    """The same real inputs for both runners, in the engine's input dtypes."""
    float_type = NUMPY_FLOAT[dtype]
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    with torch.no_grad():
        embeds = capa.embed(ids, pixels)
        prefill = capa(ids, pixel_values=pixels, attention_mask=mask, use_cache=True, last_logits_only=True)
    cache = prefill.past_key_values
    next_token = prefill.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        next_embeds = capa.adapter.embed_tokens(next_token)
    to_np = lambda t: t.detach().numpy()  # noqa: E731
    flt = lambda t: t.detach().float().numpy().astype(float_type)  # noqa: E731
    decode = {"inputs_embeds": flt(next_embeds), "position_ids": to_np(cache.next_position[:, None])}
    for s, m in enumerate(cache.segment_masks):
        decode[f"past_segment_mask.{s}"] = to_np(m).astype(np.int64)
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        decode[f"past.{i}.key"], decode[f"past.{i}.value"] = flt(k), flt(v)
    return {
        "vision": {"pixel_values": flt(pixels)},
        "embed": {"input_ids": to_np(ids)},
        "prefill": {"inputs_embeds": flt(embeds), "attention_mask": to_np(mask).astype(np.int64),
                    "position_ids": to_np(capa.adapter.default_position_ids(ids, mask)).astype(np.int64),
                    "visual_positions": to_np(capa.visual_slots(ids)).astype(np.int64)},
        "decode": decode,
    }


def compare_graphs(engine_runners: dict, capa: CapaModel, batches: list[dict], dtype: str, output_names: dict) -> dict:
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # the table below says what matters
    rtol, atol = TOLERANCES[dtype]
    modules = reference_modules(capa)
    feeds = [graph_feeds(capa, b, dtype) for b in batches]
    report = {}
    for graph, runner in engine_runners.items():
        with runner:
            metadata = runner.get_input_metadata(use_numpy_dtypes=False)
        inputs = list(metadata.keys())
        reference = CapaModelRunner(graph, modules[graph], inputs, output_names[graph], metadata)
        results = Comparator.run([runner, reference], data_loader=[f[graph] for f in feeds])
        with np.errstate(all="ignore"):  # relative errors of exact zeros
            accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(check_error_stat="max"))
        reference_outputs = results[1][1]
        outputs = {}
        for iteration, per_output in enumerate(next(iter(accuracy[0].values()))):
            for name, stats in per_output.items():
                # |engine - reference| <= atol + rtol * max|reference| over the whole output: a
                # relative tolerance on the output's scale (element-wise relative errors of
                # near-zero elements say nothing about fp16 accuracy); kept indices must be exact.
                scale = float(np.abs(np.asarray(reference_outputs[iteration][name], dtype=np.float64)).max(initial=0.0))
                r, a = (0.0, 0.0) if name == "keep_indices" else (rtol, atol)
                entry = outputs.setdefault(name, {"passed": True, "max_abs": 0.0, "normalised": 0.0, "mean_abs": 0.0,
                                                  "tolerance": {"rtol": r, "atol": a}})
                max_abs = float(stats.max_absdiff)
                entry["passed"] &= max_abs <= a + r * scale
                entry["max_abs"] = max(entry["max_abs"], max_abs)
                entry["normalised"] = max(entry["normalised"], max_abs / scale if scale else 0.0)
                entry["mean_abs"] = max(entry["mean_abs"], float(stats.mean_absdiff))
        report[graph] = {"passed": all(o["passed"] for o in outputs.values()), "outputs": outputs}
    return report


def token_agreement(engine, capa: CapaModel, unpruned: CapaModel, batch: dict, max_new_tokens: int) -> dict:
    tokens, keep, timings = engine.generate_ids(batch["input_ids"].numpy(), batch["pixel_values"].numpy(),
                                                batch["attention_mask"].numpy(), max_new_tokens)
    reference, prefill = capa.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                       max_new_tokens=max_new_tokens)
    plain, _ = unpruned.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 max_new_tokens=max_new_tokens)
    reference, plain = reference.numpy(), plain.numpy()
    forced, _, _ = engine.generate_ids(batch["input_ids"].numpy(), batch["pixel_values"].numpy(),
                                       batch["attention_mask"].numpy(), reference.shape[1], forced_tokens=reference)
    keep_ref = prefill.keep_indices.numpy()
    return {
        "engine_tokens": tokens[0].tolist(), "reference_tokens": reference[0].tolist(),
        "agreement": float((tokens == reference).mean()),
        "forced_agreement": float((forced == reference).mean()),
        "agreement_with_unpruned": float((tokens == plain).mean()),
        "keep_overlap": float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(keep, keep_ref)])),
        "timings": timings,
    }


def format_report(report: dict) -> str:
    rows = [f"{'graph':<8} {'output':<22} {'max |diff|':>10} {'/max|ref|':>10} {'tolerance':>16}  result"]
    for graph, info in report["graphs"].items():
        shown = 0
        for name, out in info["outputs"].items():
            if name.startswith("present.") and out["passed"] and shown >= 2:
                continue  # the table shows a few KV outputs; validation.json has all of them
            shown += name.startswith("present.")
            tol = f"a{out['tolerance']['atol']:.0e}+r{out['tolerance']['rtol']:.0e}*max"
            rows.append(f"{graph:<8} {name:<22} {out['max_abs']:>10.2e} {out['normalised']:>10.2e} {tol:>16}  "
                        f"{'ok' if out['passed'] else 'FAIL'}")
    for i, e2e in enumerate(report["end_to_end"]):
        rows.append(f"end-to-end input {i}: greedy-token agreement with the CapaModel {e2e['agreement']:.0%}, "
                    f"teacher-forced {e2e['forced_agreement']:.0%} (required: {report['agreement_measure']} >= "
                    f"{report['required_agreement']:.0%}), with the unpruned model "
                    f"{e2e['agreement_with_unpruned']:.0%} (informational), kept-token overlap {e2e['keep_overlap']:.0%}")
    rows.append(f"validation {'PASSED' if report['passed'] else 'FAILED'} ({report['dtype']}, {report['backend']})")
    return "\n".join(rows)
