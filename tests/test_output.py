"""What a person reads: --log-level/-q/-v on every command, library noise below the default level,
progress that stays one line on a terminal and becomes periodic lines in a log, and Polygraphy's
verdicts replaced by ours (its defaults are not our tolerances)."""

import io
import logging
import time

import numpy as np
import pytest
import torch
from polygraphy.common import TensorMetadata

from capa_export import logs
from capa_export.cli import build_parser, main
from capa_export.config import CapaConfig
from capa_export.contract import to_feed_array
from capa_export.export.graphs import graph_modules
from capa_export.method.capa_model import apply_capa
from capa_export.models import adapter_for
from PIL import Image

from capa_export.validate import CapaModelRunner, compare_graphs, format_report


@pytest.fixture(autouse=True)
def default_level_after():
    yield
    logs.configure(logs.DEFAULT_LEVEL)


def subcommands():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("flags, level", [([], "info"), (["-q"], "warning"), (["-v"], "debug"),
                                          (["--log-level", "error"], "error")])
def test_every_command_takes_the_log_level(flags, level):
    for name, sub in subcommands().items():
        positional = ["X" for a in sub._actions if not a.option_strings and a.nargs is None]
        assert sub.parse_args([*positional, *flags]).log_level == level, name


def test_library_warnings_only_under_debug(caplog):
    from transformers.utils import logging as hf_logging

    caplog.set_level(logging.DEBUG)
    logs.configure("info")
    hf_logging.get_logger("transformers.modeling_utils").warning("library noise one")
    logging.getLogger("torch.onnx").warning("library noise two")
    assert "library noise" not in caplog.text
    logs.configure("debug")
    hf_logging.get_logger("transformers.modeling_utils").warning("library noise three")
    assert "library noise three" in caplog.text


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_is_a_few_whole_lines():
    logs.configure("info")
    stream = io.StringIO()
    assert list(logs.Progress(range(200), "calibrating", "input", stream=stream, interval=3600)) == list(range(200))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 2 and lines[-1].startswith("calibrating: 200/200 inputs")


def test_progress_on_a_terminal_is_one_redrawn_line():
    logs.configure("info")
    stream = FakeTerminal()
    list(logs.Progress(range(50), "calibrating", "input", stream=stream))
    text = stream.getvalue()
    assert "\r" in text and text.count("\n") <= 1 and "50/50" in text


def test_quiet_shows_no_progress():
    logs.configure("warning")
    stream = io.StringIO()
    list(logs.Progress(range(5), "calibrating", "input", stream=stream, interval=0))
    assert stream.getvalue() == ""


def test_a_long_step_says_it_is_alive():
    logs.configure("info")
    stream = io.StringIO()
    steps = logs.Progress(["vision", "prefill"], "exporting", "graph", stream=stream, interval=0.05)
    for name in steps:
        with steps.alive(f"tracing {name}.onnx"):
            if name == "prefill":
                time.sleep(0.6)
    assert "still tracing prefill.onnx" in stream.getvalue()


def test_calibrate_in_a_log_prints_lines_not_a_bar(tmp_path, capfd):
    assert main(["calibrate", "--calibration-count", "2", "--out", str(tmp_path / "c")]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in err and "calibrating: 2/2 inputs" in err
    assert main(["calibrate", "-q", "--calibration-count", "2", "--out", str(tmp_path / "d")]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "CAPA config" in out


# --- Polygraphy's verdicts ---------------------------------------------------------------------
class NoisyRunner(CapaModelRunner):
    """The reference's own graph module with every float output moved by `relative` x its largest
    magnitude: an engine that is exactly that far off."""

    def __init__(self, spec, module, relative: float):
        metadata = TensorMetadata()
        for tensor in spec.inputs:
            from polygraphy.datatype import DataType

            array = to_feed_array(tensor, torch.zeros(0), "fp32")
            metadata.add(tensor.name, DataType.from_dtype(array.dtype),
                         [d if isinstance(d, int) else d.name for d in tensor.shape])
        super().__init__(spec, module, metadata)
        self.relative = relative

    def infer_impl(self, feed_dict):
        outputs = super().infer_impl(feed_dict)
        for name, value in outputs.items():
            if value.dtype.kind == "f" and value.size:
                value = value + self.relative * float(np.abs(value).max())
            outputs[name] = np.ascontiguousarray(value)  # as an engine's outputs are
        return outputs


@pytest.mark.parametrize("relative, passes", [(3e-3, True), (1e-1, False)])
def test_polygraphy_prints_no_verdict_of_its_own(llava, capfd, relative, passes):
    model, processor = llava
    capa = apply_capa(model, CapaConfig(prune=[(2, 64)]))
    batch = adapter_for(model).family.encode(processor, [Image.new("RGB", (64, 48), "red")],
                                             ["What is it?"])
    contract = capa.family.graph_contract(capa.layer_segments())
    modules = graph_modules(capa, "reference")
    runners = {g: NoisyRunner(contract[g], modules[g], relative) for g in ("vision", "prefill")}
    capfd.readouterr()
    graphs = compare_graphs(runners, capa, [batch], "fp16", contract)
    out, err = capfd.readouterr()
    assert "[E]" not in out + err and "FAILED" not in out + err and "[I]" not in out + err
    assert all(g["passed"] for g in graphs.values()) is passes
    table = format_report({"graphs": graphs, "end_to_end": [], "passed": passes, "dtype": "fp16",
                           "backend": "test", "agreement_measure": "agreement", "required_agreement": 1.0})
    assert ("FAIL" in table) is not passes
    if passes:  # the KV outputs the table leaves out are said to have passed too
        assert "more present.*" in table and "ok (all" in table


def near_or_far_selection(capa, swap: str):
    """A prefill selection that keeps other tokens than the reference: the (k+1)-th best instead of
    the k-th ("near": what fp16/bf16 rounding can do at a near-tie) or the worst instead of the best."""
    from capa_export.method.scoring import contribution_scores

    def select(probs, values, o_weight, keep):
        scores = contribution_scores(probs, values, o_weight, variant=capa.config.variant).double()
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        chosen = order[:, :keep].clone()
        if swap == "near":
            chosen[:, -1] = order[:, keep]
        else:
            chosen[:, 0] = order[:, -1]
        return chosen.sort(dim=-1).values.to(torch.int32)

    return select


@pytest.mark.parametrize("swap, dtype, passes", [("near", "fp16", True), ("far", "fp16", False), ("near", "fp32", False)])
def test_reduced_precision_engine_may_keep_near_equal_tokens(llava, swap, dtype, passes):
    """An engine whose kept set differs from the reference's passes the prefill comparison only at
    reduced precision and only when its tokens score within the tolerance of the reference's k-th
    score; the outputs that depend on the kept set are then left to the end-to-end check."""
    from capa_export.export.graphs import PrefillGraph

    model, processor = llava
    capa = apply_capa(model, CapaConfig(prune=[(2, 16)]))
    batch = adapter_for(model).family.encode(processor, [Image.new("RGB", (64, 48), "red")], ["What is it?"])
    contract = capa.family.graph_contract(capa.layer_segments())
    engine_module = PrefillGraph(capa, "reference")
    engine_module.select = near_or_far_selection(capa, swap)
    graphs = compare_graphs({"prefill": NoisyRunner(contract["prefill"], engine_module, 0.0)}, capa, [batch], dtype,
                            contract)
    prefill = graphs["prefill"]
    selection = prefill["selection"]["0"]
    assert selection["differs_in"] == 1 and prefill["passed"] is passes and selection["valid"] is passes
    outputs = prefill["outputs"]
    if passes:
        assert selection["largest_gap"] <= 1e-2  # fp16's rtol
        assert outputs["logits"]["not_compared"] == 1 and outputs["present.3.key"]["not_compared"] == 1
        # before the stage (and in the scoring layer, which keeps every row) the engine is compared
        assert "not_compared" not in outputs["present.1.key"] and outputs["present.1.key"]["max_abs"] == 0.0
        table = format_report({"graphs": graphs, "end_to_end": [], "passed": True, "dtype": dtype, "backend": "test",
                               "agreement_measure": "forced_agreement", "required_agreement": 0.9})
        assert "the engine kept 1 other token(s)" in table and "not compared in 1 input(s)" in table
    else:
        assert not outputs["keep_indices"]["passed"]


def test_verdict_lines_name_no_internal_field():
    report = {"graphs": {}, "passed": True, "dtype": "fp16", "backend": "test", "agreement_measure": "forced_agreement",
              "required_agreement": 0.9, "end_to_end": [{"agreement": 0.5, "forced_agreement": 1.0,
                                                         "agreement_with_unpruned": 0.5, "keep_overlap": 1.0}]}
    assert "forced_agreement" not in format_report(report) and "teacher-forced agreement >= 90%" in format_report(report)
