"""`capa-export analyze`: sinks (Probability Dumps vs Structural Anchors), attention vs
contribution rankings, FFN linearity per layer, and suggested CAPA settings (docs/method.md, "Sinks").

Definitions (our choices, all parameters of `analyze`):
- a visual token is a *sink* at a layer when the attention it receives from the scoring queries
  (summed over heads and queries) exceeds `sink_ratio` x the mean over visual tokens;
- a sink is a *Structural Anchor* when its contribution rank is within the `keep` best (CAPA at
  that budget keeps it), else a *Probability Dump* (high attention, dropped by CAPA, kept by FastV);
- suggested pruning layer K: the earliest K >= 1 whose scoring layer K-1 has a top-`keep`
  contribution set overlapping that of layer K by at least `stable_overlap` (the ranking has
  settled, so pruning there removes what later layers would also ignore);
- suggested FFN range: the longest run of layers in 1..L-2 whose held-out visual error is below
  `ffn_threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

from ..inputs import encode
from ..method.ffn import fit_ffn_approximation
from ..method.capa_model import CapaModel
from ..method.scoring import contribution_scores
from ..config import CapaConfig
from ..models import adapter_for


@dataclass
class AnalysisSettings:
    sink_ratio: float = 5.0
    keep: int = 64
    stable_overlap: float = 0.5
    ffn_threshold: float = 0.15
    ffn_ridge: float = 1e-3


def layer_token_scores(model, batch: dict, variant_for_rank: str = "contrib") -> list[dict]:
    """Per layer: attention and contribution of each visual token, from the scoring queries."""
    capa = CapaModel(model, CapaConfig(prune=[]))
    per_layer = []

    def probe(index, probs, values, o_weight, visual_slots):
        per_layer.append({
            "layer": index,
            "attention": contribution_scores(probs, values, o_weight, variant="attention")[0].float().cpu(),
            "value_norm": contribution_scores(probs, values, o_weight, variant="value_norm")[0].float().cpu(),
            "contribution": contribution_scores(probs, values, o_weight, variant="contrib")[0].float().cpu(),
        })

    capa.attention_probe = probe
    capa(**batch)
    return per_layer


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def sinks_of_layer(entry: dict, settings: AnalysisSettings) -> dict:
    attention, contribution = entry["attention"], entry["contribution"]
    keep = min(settings.keep, attention.numel())
    threshold = settings.sink_ratio * float(attention.mean())
    contrib_rank = _ranks(contribution)
    attention_rank = _ranks(attention)
    sinks = []
    for token in torch.nonzero(attention > threshold).flatten().tolist():
        rank = int(contrib_rank[token])
        sinks.append({
            "token": token,
            "attention": float(attention[token]),
            "attention_over_mean": float(attention[token]) / max(float(attention.mean()), 1e-30),
            "contribution": float(contribution[token]),
            "contribution_rank": rank,
            "label": "anchor" if rank < keep else "dump",
        })
    top_attention = set(torch.nonzero(attention_rank < keep).flatten().tolist())
    top_contrib = set(torch.nonzero(contrib_rank < keep).flatten().tolist())
    constant = bool((attention == attention[0]).all() or (contribution == contribution[0]).all())
    rho = float("nan") if constant else spearmanr(attention.numpy(), contribution.numpy()).statistic
    return {
        "layer": entry["layer"],
        "sink_threshold": threshold,
        "sinks": sinks,
        "dumps": sum(s["label"] == "dump" for s in sinks),
        "anchors": sum(s["label"] == "anchor" for s in sinks),
        "spearman_attention_contribution": float(rho),
        "topk_overlap_attention_contribution": len(top_attention & top_contrib) / keep,
        "_top_contrib": top_contrib,
    }


def suggest_pruning_layer(layers: list[dict], settings: AnalysisSettings, num_layers: int) -> int:
    for current, following in zip(layers, layers[1:]):
        overlap = len(current["_top_contrib"] & following["_top_contrib"]) / max(1, settings.keep)
        if current["layer"] + 1 < num_layers and overlap >= settings.stable_overlap:
            return current["layer"] + 1
    return 2  # FastV's default


def suggest_ffn_range(errors: dict[int, dict], threshold: float) -> list[int] | None:
    best, run = None, []
    for layer in sorted(errors):
        if errors[layer]["heldout"] < threshold:
            run.append(layer)
            if best is None or len(run) > len(best):
                best = list(run)
        else:
            run = []
    return [best[0], best[-1]] if best else None


def analyze(model, processor, sample, calibration_samples, settings: AnalysisSettings = AnalysisSettings(),
            progress: bool = True) -> tuple[dict, dict]:
    """(report, raw per-layer scores) for one image + question and a calibration set."""
    adapter = adapter_for(model)
    batch = encode(adapter, processor, sample)
    per_layer = layer_token_scores(model, batch)
    layers = [sinks_of_layer(entry, settings) for entry in per_layer]
    calibration = [encode(adapter, processor, s) for s in calibration_samples]
    ffn = fit_ffn_approximation(model, calibration, list(range(adapter.num_layers)), ridge=settings.ffn_ridge,
                                text_errors=True, progress=progress)
    errors = ffn.errors()
    suggested_k = suggest_pruning_layer(layers, settings, adapter.num_layers)
    ffn_range = suggest_ffn_range({l: e for l, e in errors.items() if 1 <= l <= adapter.num_layers - 2},
                                  settings.ffn_threshold)
    for entry in layers:
        entry.pop("_top_contrib")
        entry["ffn_error_visual"] = errors[entry["layer"]]["heldout"]
        entry["ffn_error_text"] = errors[entry["layer"]]["text"]
    fingerprint = {k: v for k, v in adapter.fingerprint().items() if k != "weight_sample"}
    report = {
        "model": fingerprint,
        "input": {"image": sample.source, "question": sample.question,
                  "visual_tokens": int(per_layer[0]["attention"].numel()) if per_layer else 0},
        "settings": settings.__dict__,
        "calibration_inputs": [s.source for s in calibration_samples],
        "layers": layers,
        "suggested": {"prune_layer": suggested_k, "ffn_range": ffn_range,
                      "capa_config": CapaConfig(prune=[(suggested_k, settings.keep)],
                                                ffn_layers="auto" if ffn_range else [],
                                                ffn_range=tuple(ffn_range) if ffn_range else None,
                                                ffn_threshold=settings.ffn_threshold).to_dict()},
    }
    return report, {"per_layer": per_layer, "errors": errors}


def format_table(report: dict) -> str:
    rows = [f"{'layer':>5} {'sinks':>5} {'dumps':>5} {'anchors':>7} {'spearman':>8} {'top-k overlap':>13} "
            f"{'FFN err visual':>14} {'FFN err text':>12}"]
    for entry in report["layers"]:
        rows.append(f"{entry['layer']:>5} {len(entry['sinks']):>5} {entry['dumps']:>5} {entry['anchors']:>7} "
                    f"{entry['spearman_attention_contribution']:>8.3f} "
                    f"{entry['topk_overlap_attention_contribution']:>13.2f} "
                    f"{entry['ffn_error_visual']:>14.3f} {entry['ffn_error_text']:>12.3f}")
    suggested = report["suggested"]
    rows.append(f"suggested: prune at layer K={suggested['prune_layer']} (keep {report['settings']['keep']}), "
                f"FFN approximation range {suggested['ffn_range'] or 'none below the threshold'}")
    return "\n".join(rows)
