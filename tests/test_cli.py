"""The CLI on the embedded default: it runs, writes complete artifacts, and answers bad input
with one line and exit status 2, leaving no output folder behind."""

import json
import subprocess
import sys

import pytest

from capa_export.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_writes_report_and_plots(tmp_path, capsys):
    code, out, _ = run(capsys, "analyze", "--out", str(tmp_path / "a"), "--calibration-count", "4")
    assert code == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    from capa_export.models import load_model
    from capa_export.pipeline import DEFAULT_MODEL

    assert len(report["layers"]) == load_model(DEFAULT_MODEL)[0].config.text_config.num_hidden_layers  # one per layer
    for entry in report["layers"]:
        for sink in entry["sinks"]:
            assert sink["label"] in ("anchor", "dump")
            assert sink["attention"] > entry["sink_threshold"]
    for png in ("sinks.png", "attention_vs_contribution.png", "ffn_linearity.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    assert "suggested: prune at layer" in out


def test_calibrate_then_generate(tmp_path, capsys):
    code, out, _ = run(capsys, "calibrate", "--out", str(tmp_path / "c"), "--calibration-count", "4")
    assert code == 0
    for name in ("capa_config.json", "ffn_approx.safetensors", "ffn_approx.json", "calibration.json"):
        assert (tmp_path / "c" / name).is_file()
    config = json.loads((tmp_path / "c" / "capa_config.json").read_text())
    assert isinstance(config["ffn_layers"], list)  # "auto" is frozen into the chosen layers
    code, out, _ = run(capsys, "generate", "--capa", str(tmp_path / "c"), "--max-new-tokens", "3",
                       "--json", str(tmp_path / "g.json"))
    assert code == 0
    result = json.loads((tmp_path / "g.json").read_text())
    assert len(result["keep_indices"]) == 64 and result["keep_indices"] == sorted(result["keep_indices"])
    assert len(result["tokens"]) == 3


def test_calibration_folder(tmp_path, capsys):
    from capa_export.inputs import synthetic_image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        synthetic_image(i).save(folder / f"img{i}.png")
    (folder / "prompts.txt").write_text("What is this?\n")
    code, _, _ = run(capsys, "calibrate", "--calibration", str(folder), "--out", str(tmp_path / "c"))
    assert code == 0
    manifest = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert len(manifest["calibration_inputs"]) == 3


def bad(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    return [
        (["generate", "--image", str(tmp_path / "missing.png")], "missing.png does not exist"),
        (["generate", "--image", str(broken)], "cannot be read as an image"),
        (["analyze", "--model", str(tmp_path / "no-such-model")], "does not exist"),
        (["calibrate", "--calibration", str(empty)], "holds no images"),
        (["calibrate", "--prune", "9:64"], "outside the decoder"),
        (["generate", "--prune", "2:1000"], "k must be in [1, 576]"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    argv, message = bad(tmp_path)[case]
    out_dir = tmp_path / "out"
    if argv[0] in ("analyze", "calibrate"):
        argv = argv + ["--out", str(out_dir)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_approximation_from_another_model_is_refused(tmp_path, capsys):
    assert run(capsys, "calibrate", "--out", str(tmp_path / "c"), "--calibration-count", "2")[0] == 0
    meta = json.loads((tmp_path / "c" / "ffn_approx.json").read_text())
    meta["fingerprint"]["weight_sample"] = [x + 1.0 for x in meta["fingerprint"]["weight_sample"]]
    (tmp_path / "c" / "ffn_approx.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "generate", "--capa", str(tmp_path / "c"))
    assert code == 2 and "fitted on another model" in err


def test_console_script_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "capa_export.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("analyze", "calibrate", "generate"):
        assert command in result.stdout
