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
        from polygraphy.datatype import DataType

        metadata = TensorMetadata()
        for tensor in self.graph.spec.inputs:
            array = to_feed_array(tensor, torch.zeros(0), self.dtype)  # the numpy type this runner takes
            metadata.add(tensor.name, DataType.from_dtype(array.dtype),
                         [d if isinstance(d, int) else d.name for d in tensor.shape])
        return metadata

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


def to_feed(spec: GraphSpec, values: dict, dtype: str) -> dict:
    """Tensors keyed by input name -> numpy arrays of the types the engine's graph takes."""
    return {tensor.name: to_feed_array(tensor, values[tensor.name], dtype) for tensor in spec.inputs}


def compare_graphs(engine_runners: dict, capa: CapaModel, batches: list[dict], dtype: str,
                   contract: GraphContract) -> dict:
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc
    from .logs import polygraphy_verdicts_hidden

    rtol, atol = TOLERANCES[dtype]
    modules = graph_modules(capa, "reference")
    values = [graph_inputs(capa, b) for b in batches]
    report = {}
    for graph, runner in engine_runners.items():
        with runner:
            metadata = runner.get_input_metadata(use_numpy_dtypes=False)
        spec = contract[graph]
        reference = CapaModelRunner(spec, modules[graph], metadata)
        with polygraphy_verdicts_hidden():  # its verdicts use its default tolerances; ours are in the report
            results = Comparator.run([runner, reference],
                                     data_loader=[to_feed(spec, v[graph], dtype) for v in values])
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
    tokens, keep, timings = engine.generate_ids(batch, max_new_tokens)
    reference, prefill = capa.generate(**batch, max_new_tokens=max_new_tokens)
    plain, _ = unpruned.generate(**batch, max_new_tokens=max_new_tokens)
    reference, plain = reference.numpy(), plain.numpy()
    forced, _, _ = engine.generate_ids(batch, reference.shape[1], forced_tokens=reference)
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
        shown, hidden = 0, []
        for name, out in info["outputs"].items():
            if name.startswith("present.") and out["passed"] and shown >= 2:
                hidden.append(out)  # the table shows a few KV outputs; validation.json has all of them
                continue
            shown += name.startswith("present.")
            tol = f"a{out['tolerance']['atol']:.0e}+r{out['tolerance']['rtol']:.0e}*max"
            rows.append(f"{graph:<8} {name:<22} {out['max_abs']:>10.2e} {out['normalised']:>10.2e} {tol:>16}  "
                        f"{'ok' if out['passed'] else 'FAIL'}")
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
