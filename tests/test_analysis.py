"""Sink labelling and suggestions on constructed per-layer scores (known answers)."""

import torch

from capa_export.analysis.report import AnalysisSettings, sinks_of_layer, suggest_ffn_range, suggest_pruning_layer


def entry(layer, attention, contribution):
    return {"layer": layer, "attention": torch.tensor(attention), "contribution": torch.tensor(contribution)}


def test_dump_and_anchor():
    # 20 tokens; tokens 0 and 1 take outsized attention. Token 0 carries almost nothing (a
    # Probability Dump), token 1 carries the most (a Structural Anchor).
    attention = [30.0, 20.0] + [1.0] * 18
    contribution = [0.001, 5.0] + [0.5 + 0.01 * i for i in range(18)]
    result = sinks_of_layer(entry(3, attention, contribution), AnalysisSettings(sink_ratio=5.0, keep=4))
    labels = {s["token"]: s["label"] for s in result["sinks"]}
    assert labels == {0: "dump", 1: "anchor"}
    assert result["dumps"] == 1 and result["anchors"] == 1
    assert abs(result["sink_threshold"] - 5.0 * sum(attention) / len(attention)) < 1e-5
    # attention's top 4: ties among the 1.0s go to the lower index, so {0, 1, 2, 3};
    # contribution's top 4 = {1, 19, 18, 17}: overlap {1}
    assert result["topk_overlap_attention_contribution"] == 1 / 4


def test_no_sinks_in_uniform_attention():
    result = sinks_of_layer(entry(0, [1.0] * 10, [float(i) for i in range(10)]), AnalysisSettings(keep=3))
    assert result["sinks"] == []


def test_suggested_ffn_range_is_the_longest_run_below_threshold():
    errors = {1: {"heldout": 0.05}, 2: {"heldout": 0.3}, 3: {"heldout": 0.1}, 4: {"heldout": 0.12},
              5: {"heldout": 0.05}, 6: {"heldout": 0.5}}
    assert suggest_ffn_range(errors, 0.15) == [3, 5]
    assert suggest_ffn_range(errors, 0.01) is None


def test_suggested_pruning_layer_is_where_the_ranking_settles():
    settings = AnalysisSettings(keep=4, stable_overlap=0.5)
    layers = [{"layer": 0, "_top_contrib": {0, 1, 2, 3}}, {"layer": 1, "_top_contrib": {4, 5, 6, 7}},
              {"layer": 2, "_top_contrib": {4, 5, 6, 9}}, {"layer": 3, "_top_contrib": {4, 5, 6, 9}}]
    assert suggest_pruning_layer(layers, settings, num_layers=8) == 2  # layers 1 and 2 agree on 3 of 4
