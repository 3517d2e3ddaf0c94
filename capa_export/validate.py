"""`capa-export validate`: an engine against the PyTorch CapaModel, with Polygraphy.

1. Graph by graph: Polygraphy's Comparator runs the engine's runner (ONNX Runtime or TensorRT) and
   a runner of the fp32 CapaModel (the same graph modules the exporter traced, with the reference
   token selection) on the same feeds, and compares every output within the dtype's tolerance.
2. End to end: greedy generation with the engine vs the CapaModel: token agreement (must be 100%
   in fp32), and, for information, agreement with the unpruned model.

The PyTorch side runs first (`reference_results`), then the model is given back, then the engine's
graphs run one session at a time: the fp32 model and the engine's sessions are never in memory
together (with the exporter's leak fixed too, builds went from ~3x to under 2x the weight bytes;
BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .contract import GraphContract, GraphSpec, to_feed_array
from .export.graphs import graph_inputs, graph_modules
from .method.capa_model import CapaModel

# (rtol, atol) per engine dtype, on the output's scale (see compare_graphs): fp32 ~1e-4, reduced
# precision ~1e-2 relative (docs/method.md, "Validation")
#: how the report's agreement measures read in a sentence
MEASURES = {"agreement": "greedy-token agreement", "forced_agreement": "teacher-forced agreement"}
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 2e-2), "bf16": (2e-2, 5e-2)}


class CapaModelRunner(BaseRunner):
    """A Polygraphy runner over one graph module of the PyTorch reference (fp32, CPU)."""

    def __init__(self, spec: GraphSpec, module, input_metadata: TensorMetadata):
        super().__init__(name=f"capa-pytorch:{spec.name}")
        self.spec, self.module, self.metadata = spec, module, input_metadata

    def get_input_metadata_impl(self):
        return self.metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        tensors = {name: torch.from_numpy(np.asarray(value, dtype=np.float32) if np.asarray(value).dtype.kind == "f"
                                          else np.asarray(value))
                   for name, value in feed_dict.items()}
        with torch.no_grad():
            outputs = self.module(*self.spec.forward_arguments(tensors))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, out.detach().float().numpy() if out.is_floating_point() else out.numpy())
                           for name, out in zip(self.spec.output_names, outputs))


class EngineGraphRunner(BaseRunner):
    """A Polygraphy runner over one of the engine's graphs (`Backend.graph`): the same objects the
    runtime runs, for every backend and dtype (bf16 outputs come back as fp32 arrays)."""

    def __init__(self, graph, dtype: str):
        super().__init__(name=f"engine:{graph.spec.name}")
        self.graph, self.dtype = graph, dtype

    def get_input_metadata_impl(self):
        return input_metadata(self.graph.spec, self.dtype)

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = self.graph.run({name: torch.from_numpy(np.asarray(value)) for name, value in feed_dict.items()})
        result = OrderedDict()
        for name, handle in outputs.items():
            tensor = self.graph.tensor(handle).cpu()
            result[name] = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        self.inference_time = time.perf_counter() - start
        return result

    def deactivate_impl(self):
        pass

    def activate_impl(self):
        pass


def input_metadata(spec: GraphSpec, dtype: str) -> TensorMetadata:
    """Polygraphy's description of a graph's inputs in the numpy types an engine of `dtype` takes."""
    from polygraphy.datatype import DataType

    metadata = TensorMetadata()
    for tensor in spec.inputs:
        array = to_feed_array(tensor, torch.zeros(0), dtype)
        metadata.add(tensor.name, DataType.from_dtype(array.dtype), [d if isinstance(d, int) else d.name for d in tensor.shape])
    return metadata


def to_feed(spec: GraphSpec, values: dict, dtype: str) -> dict:
    """Tensors keyed by input name -> numpy arrays of the types the engine's graph takes."""
    return {tensor.name: to_feed_array(tensor, values[tensor.name], dtype) for tensor in spec.inputs}


@dataclass
class Reference:
    """What validation compares an engine with, computed by the PyTorch CapaModel alone: each
    graph's feeds and outputs (Polygraphy RunResults), and per batch the reference's and the
    unpruned model's greedy tokens and the kept visual tokens; per prefill feed, the scores of each
    pruning stage, and the prefill outputs that depend on which tokens were kept."""
    dtype: str
    feeds: dict       # graph -> [feed dict per batch]
    results: dict     # graph -> RunResults of the reference runner
    tokens: list      # per batch: {"reference", "unpruned", "keep"} numpy arrays
    stage_scores: list = None  # per prefill feed: [float64 [B, N] scores per stage]
    after_selection: frozenset = frozenset()  # prefill outputs computed from the kept tokens


class RecordingSelection:
    """The reference's own token selection, keeping each stage's scores (float64): what an engine's
    different kept set is checked against at reduced precision (`selection_check`)."""

    def __init__(self, capa: CapaModel):
        self.capa, self.calls = capa, []

    def __call__(self, probs, values, o_weight, keep: int):
        from .method.scoring import contribution_scores

        self.calls.append(contribution_scores(probs, values, o_weight, variant=self.capa.config.variant).double())
        return self.capa.select_tokens(probs, values, o_weight, keep)


def after_selection_outputs(capa: CapaModel) -> frozenset:
    """Prefill outputs that the kept tokens change: the logits, the masks and KV caches of the layers
    after the first stage (the scoring layer itself still holds every row)."""
    segments = capa.layer_segments()
    names = {"logits"} | {f"segment_mask.{s}" for s in range(1, max(segments, default=0) + 1)}
    names |= {f"present.{i}.{kv}" for i, s in enumerate(segments) if s >= 1 for kv in ("key", "value")}
    return frozenset(names)


@torch.no_grad()
def reference_results(capa: CapaModel, unpruned: CapaModel | None, batches: list[dict], dtype: str,
                      contract: GraphContract, graphs, max_new_tokens: int = 0) -> Reference:
    """Run the PyTorch side of a validation: the reference graph modules on every graph's feeds,
    and (given `unpruned`) greedy generation of max_new_tokens by both models."""
    from polygraphy.comparator import Comparator

    from .logs import polygraphy_verdicts_hidden

    modules = graph_modules(capa, "reference")
    recorder = modules["prefill"].select = RecordingSelection(capa)
    values = [graph_inputs(capa, b) for b in batches]
    feeds, results, stage_scores = {}, {}, None
    for graph in graphs:
        spec = contract[graph]
        feeds[graph] = [to_feed(spec, v[graph], dtype) for v in values]
        runner = CapaModelRunner(spec, modules[graph], input_metadata(spec, dtype))
        recorder.calls.clear()
        with polygraphy_verdicts_hidden():
            results[graph] = Comparator.run([runner], data_loader=feeds[graph])
        if graph == "prefill":
            stages = len(capa.prune_at)
            stage_scores = [recorder.calls[i * stages:(i + 1) * stages] for i in range(len(feeds[graph]))]
    tokens = []
    if unpruned is not None:
        for batch in batches:
            reference, prefill = capa.generate(**batch, max_new_tokens=max_new_tokens)
            plain, _ = unpruned.generate(**batch, max_new_tokens=max_new_tokens)
            tokens.append({"reference": reference.numpy(), "unpruned": plain.numpy(),
                           "keep": prefill.keep_indices.numpy()})
    return Reference(dtype, feeds, results, tokens, stage_scores, after_selection_outputs(capa))


def selection_check(engine_keep: np.ndarray, reference_keep: np.ndarray, stage_scores: list, rtol: float) -> dict | None:
    """None when the engine kept the reference's tokens. Otherwise whether its kept set is still a
    top-k of the reference's scores within `rtol` of the largest score: rounding in fp16/bf16 can
    swap two near-equal scores at the k-th place, which changes the kept set but not the method.
    Only a one-stage schedule can be checked (only the last stage's kept set is an output)."""
    if engine_keep.shape == reference_keep.shape and bool((engine_keep == reference_keep).all()):
        return None
    differs = int(sum(len(set(r) - set(e)) for e, r in zip(engine_keep.tolist(), reference_keep.tolist())))
    if rtol == 0.0 or stage_scores is None or len(stage_scores) != 1 or engine_keep.shape != reference_keep.shape:
        reason = "fp32 must keep the same tokens" if rtol == 0.0 else \
            f"a {len(stage_scores or [])}-stage schedule: only the same kept set can be checked"
        return {"differs_in": differs, "valid": False, "reason": reason}
    scores = stage_scores[0]  # [B, N] float64
    k = engine_keep.shape[1]
    kth = torch.sort(scores, dim=-1, descending=True).values[:, k - 1]
    kept = scores.gather(1, torch.as_tensor(engine_keep, dtype=torch.int64))
    gap = float(((kth - kept.min(dim=1).values) / scores.abs().amax(dim=1).clamp_min(1e-30)).max())
    return {"differs_in": differs, "largest_gap": gap, "valid": bool(gap <= rtol),
            "reason": f"kept tokens score within {gap:.1e} of the k-th largest reference score (x its largest; "
                      f"allowed {rtol:.0e})"}


def compare_graph(runner, reference: Reference, graph: str) -> dict:
    """One engine graph's outputs against the reference's, within the dtype's tolerance."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc

    from .logs import polygraphy_verdicts_hidden

    rtol, atol = TOLERANCES[reference.dtype]
    with polygraphy_verdicts_hidden():  # its verdicts use its default tolerances; ours are in the report
        engine_results = Comparator.run([runner], data_loader=reference.feeds[graph])
        results = RunResults([*engine_results.items(), *reference.results[graph].items()])  # names may repeat
        with np.errstate(all="ignore"):  # relative errors of exact zeros
            accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(check_error_stat="max"))
    reference_outputs = next(iter(reference.results[graph].values()))
    # reduced precision may keep other near-equal tokens: then the kept set is checked against the
    # reference's scores, and what depends on it is left to the end-to-end (teacher-forced) check
    selections = {}
    if graph == "prefill" and reference.stage_scores is not None:
        engine_outputs = next(iter(engine_results.values()))
        for iteration, reference_iteration in enumerate(reference_outputs):
            check = selection_check(np.asarray(engine_outputs[iteration]["keep_indices"]),
                                    np.asarray(reference_iteration["keep_indices"]),
                                    reference.stage_scores[iteration], 0.0 if reference.dtype == "fp32" else rtol)
            if check is not None:
                selections[iteration] = check
    outputs = {}
    for iteration, per_output in enumerate(next(iter(accuracy[0].values()))):
        selection = selections.get(iteration)
        for name, stats in per_output.items():
            if selection is not None and selection["valid"] and (
                    name == "keep_indices" or name in reference.after_selection):
                entry = outputs.setdefault(name, {"passed": True, "max_abs": 0.0, "normalised": 0.0, "mean_abs": 0.0,
                                                  "tolerance": {"rtol": 0.0, "atol": 0.0}})
                entry["not_compared"] = entry.get("not_compared", 0) + 1
                continue
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
    result = {"passed": all(o["passed"] for o in outputs.values()) and all(s["valid"] for s in selections.values()),
              "outputs": outputs}
    if selections:
        result["selection"] = {str(i): s for i, s in selections.items()}
    return result


def compare_graphs(engine_runners: dict, capa: CapaModel, batches: list[dict], dtype: str,
                   contract: GraphContract) -> dict:
    """Every runner's graph against the reference (both in memory: for tests and small models;
    `pipeline.validate_engine` computes the reference first and opens one engine graph at a time)."""
    reference = reference_results(capa, None, batches, dtype, contract, list(engine_runners))
    return {graph: compare_graph(runner, reference, graph) for graph, runner in engine_runners.items()}


def token_agreement(engine, reference_tokens: dict, batch: dict) -> dict:
    """The engine's greedy tokens (free-running and fed the reference's) against the reference's."""
    reference, plain, keep_ref = reference_tokens["reference"], reference_tokens["unpruned"], reference_tokens["keep"]
    tokens, keep, timings = engine.generate_ids(batch, reference.shape[1])  # max_new_tokens, as the reference
    forced, _, _ = engine.generate_ids(batch, reference.shape[1], forced_tokens=reference)
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
        shown, hidden = 0, []
        for name, out in info["outputs"].items():
            if name.startswith("present.") and out["passed"] and shown >= 2:
                hidden.append(out)  # the table shows a few KV outputs; validation.json has all of them
                continue
            shown += name.startswith("present.")
            if out.get("not_compared"):
                rows.append(f"{graph:<8} {name:<22} {'':>10} {'':>10} {'':>16}  not compared in {out['not_compared']} "
                            f"input(s): it depends on the kept tokens, which differ (below)")
                continue
            tol = f"a{out['tolerance']['atol']:.0e}+r{out['tolerance']['rtol']:.0e}*max"
            rows.append(f"{graph:<8} {name:<22} {out['max_abs']:>10.2e} {out['normalised']:>10.2e} {tol:>16}  "
                        f"{'ok' if out['passed'] else 'FAIL'}")
        for iteration, selection in info.get("selection", {}).items():
            rows.append(f"{graph:<8} input {iteration}: the engine kept {selection['differs_in']} other token(s): "
                        f"{selection['reason']}  {'ok' if selection['valid'] else 'FAIL'}")
        if hidden:
            rows.append(f"{graph:<8} {f'{len(hidden)} more present.*':<22} {max(o['max_abs'] for o in hidden):>10.2e} "
                        f"{max(o['normalised'] for o in hidden):>10.2e} {'(largest)':>16}  ok (all; see "
                        f"validation.json)")
    for i, e2e in enumerate(report["end_to_end"]):
        rows.append(f"end-to-end input {i}: greedy-token agreement with the CapaModel {e2e['agreement']:.0%}, "
                    f"teacher-forced {e2e['forced_agreement']:.0%} (required: {MEASURES[report['agreement_measure']]} >= "
                    f"{report['required_agreement']:.0%}), with the unpruned model "
                    f"{e2e['agreement_with_unpruned']:.0%} (informational), kept-token overlap {e2e['keep_overlap']:.0%}")
    rows.append(f"validation {'PASSED' if report['passed'] else 'FAILED'} ({report['dtype']}, {report['backend']})")
    return "\n".join(rows)
