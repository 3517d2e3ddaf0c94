"""Small output items: no `nan` column in calibrate's table, no Python dict in export's summary."""

import re

import pytest

from capa_export.cli import main
from capa_export.export.exporter import format_summary


def test_calibrate_prints_no_nan(tmp_path, capsys):
    assert main(["calibrate", "-q", "--calibration-count", "2", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and not re.search(r"\bnan\b", out)


def test_export_summary_prints_no_python_dict():
    manifest = {"graphs": {"prefill": {"nodes": 10, "parameters": 1000,
                                       "ops": {"MatMul": 4, "CapaContribTopK": 1, "TopK": 1}}},
                "pruning": "function", "k": 64, "ffn_layers": [3],
                "weights": {"bytes_stored": 2**20, "bytes_referenced": 2**21, "distinct_tensors": 5}}
    summary = format_summary(manifest)
    assert "{" not in summary and "1 CapaContribTopK" in summary


def test_plots_count_in_whole_numbers_mark_layer_k_and_show_several_layers(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.ticker import MaxNLocator

    from capa_export.analysis import plots

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    monkeypatch.setattr(plots.plt, "close", lambda fig: None)
    layers = [{"layer": i, "anchors": i % 2, "dumps": 1, "spearman_attention_contribution": 0.9,
               "topk_overlap_attention_contribution": 0.8, "sinks": []} for i in range(8)]
    report = {"layers": layers, "settings": {"sink_ratio": 5, "keep": 16}, "suggested": {"prune_layer": 3}}
    per_layer = [{"attention": [0.1, 0.2], "contribution": [1.0, 2.0]} for _ in range(8)]
    plots.plot_sinks(report, tmp_path / "s.png")
    count_axis, rho_axis = figures[-1].axes[:2]
    assert count_axis.yaxis.get_major_locator()._integer
    k_lines = [line for line in rho_axis.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in k_lines] == [[3, 3]]
    plots.plot_attention_vs_contribution(report, per_layer, tmp_path / "a.png")
    titles = [ax.get_title() for ax in figures[-1].axes]
    assert len(titles) >= 3 and any("layer 2" in t for t in titles) and any("layer 7" in t for t in titles)
    assert isinstance(count_axis.yaxis.get_major_locator(), MaxNLocator)


def test_a_two_stage_summary_names_the_last_stages_layer(capsys):
    assert main(["generate", "-q", "--prune", "1:64", "3:16", "--ffn-layers", "none", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept 16 visual tokens from layer 3 (stages 1:64, 3:16)" in out


@pytest.mark.parametrize("argv", [["generate", "--prompt", "  "], ["run", "ENGINE", "--prompt", ""],
                                  ["analyze", "--prompt", ""]])
def test_an_empty_prompt_is_refused_in_one_line(tmp_path, capsys, argv):
    argv = [str(tmp_path / "no-engine") if a == "ENGINE" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is empty; give a question about the image" in err and len(err.strip().splitlines()) == 1


def test_a_tiny_image_is_taken_with_a_warning(tmp_path, capsys):
    from PIL import Image

    from capa_export import logs
    from capa_export.inputs import open_image

    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "small.png")
    logs.configure("info")
    capsys.readouterr()
    assert open_image(tmp_path / "dot.png").size == (1, 1)
    assert "dot.png is 1 x 1 pixels" in capsys.readouterr().err
    open_image(tmp_path / "small.png")
    assert capsys.readouterr().err == ""


def test_an_image_folder_is_named_as_a_folder(tmp_path, capsys):
    assert main(["generate", "--image", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err
