"""Small output items: no `nan` column in calibrate's table, no Python dict in export's summary."""

import re

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
    assert main(["generate", "-q", "--prune", "2:64", "4:16", "--ffn-layers", "none", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept 16 visual tokens from layer 4 (stages 2:64, 4:16)" in out
