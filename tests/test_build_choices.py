"""One command, real choices: build --prune K:k / none / auto, --keep, --analysis DIR, checked
against what `analyze` itself reports for the same model and inputs."""

import json
import shutil

import pytest

from capa_export import choices
from capa_export.cli import main
from capa_export.errors import CapaError
from capa_export.inputs import builtin_samples


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """An `analyze` folder of tiny-llava (keep 16) on the inputs build's own analysis uses."""
    out = tmp_path_factory.mktemp("analysis") / "a"
    question = builtin_samples(1, seed=1)[0].question
    assert main(["analyze", "-q", "--keep", "16", "--prompt", question, "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def engine_schedule(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return manifest["capa_config"]["prune"], manifest["capa_config"]["ffn_layers"], manifest["k"]


def in_range(layers, ffn_range):
    return all(ffn_range[0] <= layer <= ffn_range[1] for layer in layers) if ffn_range else layers == []


def test_prune_auto_takes_the_analysis_reports_suggestion(analysis, tmp_path, capsys):
    folder, report = analysis
    code, _, err = run(capsys, "build", "--prune", "auto", "--analysis", folder, "--out", tmp_path / "e",
                       "--validate-tokens", "2")
    assert code == 0, err
    prune, ffn_layers, k = engine_schedule(tmp_path / "e")
    assert prune == [[report["suggested"]["prune_layer"], report["settings"]["keep"]]] and k == 16
    assert in_range(ffn_layers, report["suggested"]["ffn_range"])


def test_prune_auto_without_a_report_analyses_now_and_keep_sets_k(analysis, tmp_path, capsys):
    _, report = analysis
    code, _, err = run(capsys, "build", "--prune", "auto", "--keep", "16", "--out", tmp_path / "e",
                       "--validate-tokens", "2")
    assert code == 0, err
    prune, ffn_layers, _ = engine_schedule(tmp_path / "e")
    assert prune == [[report["suggested"]["prune_layer"], 16]]
    assert in_range(ffn_layers, report["suggested"]["ffn_range"])


def test_keep_alone_is_the_default_stage_and_stages_stand_alone():
    assert choices.stages(None, 20) == [(choices.DEFAULT_PRUNE_LAYER, 20)]
    assert choices.stages([(1, 40), (3, 10)], None) == [(1, 40), (3, 10)]
    assert choices.stages(None, None) is None and choices.stages([], None) == []


@pytest.mark.parametrize("argv, message", [
    (["build", "--prune", "2:32", "--keep", "16"], "both give k"),
    (["build", "--prune", "none", "--keep", "16"], "nothing is pruned"),
    (["build", "--analysis", "DIR"], "--prune auto only"),
    (["build", "--prune", "auto", "2:16"], "stands alone"),
    (["build", "--keep", "0"], "--keep 0"),
    (["build", "--prune", "auto", "--analysis", "MISSING"], "has no report.json"),
    (["calibrate", "--prune", "auto"], "build only"),
])
def test_contradictions_are_refused_in_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_analysis_of_another_model_is_refused(analysis, tmp_path, capsys):
    folder = tmp_path / "other"
    shutil.copytree(analysis[0], folder)
    report = json.loads((folder / "report.json").read_text())
    report["model"]["num_layers"] += 5
    (folder / "report.json").write_text(json.dumps(report))
    code, _, err = run(capsys, "build", "--prune", "auto", "--analysis", folder, "--out", tmp_path / "e")
    assert code == 2 and "analysis of another model" in err


def test_prune_none_is_taken(tmp_path, capsys):
    code, out, err = run(capsys, "calibrate", "--prune", "none", "--calibration-count", "1", "--out", tmp_path / "c")
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "capa_config.json").read_text())["prune"] == []


def test_a_bad_report_is_refused_before_loading(analysis, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(analysis[0], folder)
    report = json.loads((folder / "report.json").read_text())
    report["suggested"]["prune_layer"] = "2; rm -rf /"
    (folder / "report.json").write_text(json.dumps(report))
    with pytest.raises(CapaError, match="whole numbers"):
        choices.read_suggestion(folder)
