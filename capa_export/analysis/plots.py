"""PNG plots of an analysis report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_sinks(report: dict, path: Path) -> Path:
    layers = [e["layer"] for e in report["layers"]]
    fig, (ax_count, ax_rho) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_count.bar(layers, [e["anchors"] for e in report["layers"]], label="Structural Anchors", color="tab:green")
    ax_count.bar(layers, [e["dumps"] for e in report["layers"]], bottom=[e["anchors"] for e in report["layers"]],
                 label="Probability Dumps", color="tab:red")
    ax_count.set_ylabel("visual sinks")
    ax_count.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole numbers only
    ax_count.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_count.set_title(f"Sinks (attention > {report['settings']['sink_ratio']}x mean), labelled by contribution "
                       f"rank < {report['settings']['keep']}")
    ax_count.legend()
    ax_rho.plot(layers, [e["spearman_attention_contribution"] for e in report["layers"]], marker="o",
                label="Spearman(attention, contribution)")
    ax_rho.plot(layers, [e["topk_overlap_attention_contribution"] for e in report["layers"]], marker="s",
                label=f"top-{report['settings']['keep']} overlap")
    # on layer K itself: the first layer that runs with the kept tokens (scored at K-1)
    ax_rho.axvline(report["suggested"]["prune_layer"], color="grey", linestyle="--",
                   label=f"suggested K = {report['suggested']['prune_layer']} (pruned from this layer on)")
    ax_rho.set_xlabel("decoder layer")
    ax_rho.set_ylim(-0.05, 1.05)
    ax_rho.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shown_layers(report: dict, count: int = 4) -> list[int]:
    """The layers attention_vs_contribution.png shows: the scoring layer K-1 of the suggestion, the
    first and the last, and one between (up to `count`, in order)."""
    layers = [e["layer"] for e in report["layers"]]
    scoring = max(layers[0], report["suggested"]["prune_layer"] - 1)
    chosen = {layers[0], scoring, layers[len(layers) // 2], layers[-1]}
    return sorted(chosen)[:count]


def plot_attention_vs_contribution(report: dict, per_layer: list[dict], path: Path) -> Path:
    shown = shown_layers(report)
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 4.5), squeeze=False)
    scoring = max(shown[0], report["suggested"]["prune_layer"] - 1)
    for ax, layer in zip(axes[0], shown):
        entry = per_layer[layer]
        sinks = next(e for e in report["layers"] if e["layer"] == layer)["sinks"]
        ax.scatter(entry["attention"], entry["contribution"], s=8, color="tab:blue", alpha=0.5, label="visual tokens")
        for label, colour in (("anchor", "tab:green"), ("dump", "tab:red")):
            chosen = [s for s in sinks if s["label"] == label]
            if chosen:
                ax.scatter([s["attention"] for s in chosen], [s["contribution"] for s in chosen], s=40, color=colour,
                           edgecolor="black", label=f"{label}s")
        # log axes: a few sinks take most of the mass, and the bulk of the tokens sits decades below
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("attention received (log)")
        ax.set_title(f"layer {layer}" + (" (scores the suggested pruning)" if layer == scoring else ""))
    axes[0][0].set_ylabel("attention contribution C_j (log)")
    axes[0][0].legend()
    fig.suptitle("Attention vs contribution per visual token (sum over heads and scoring queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ffn_linearity(report: dict, path: Path) -> Path:
    layers = [e["layer"] for e in report["layers"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [e["ffn_error_visual"] for e in report["layers"]], marker="o", label="visual rows (held out)")
    ax.plot(layers, [e["ffn_error_text"] for e in report["layers"]], marker="s", label="text rows, same map")
    ax.axhline(report["settings"]["ffn_threshold"], color="grey", linestyle="--", label="threshold")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the affine FFN fit")
    ax.set_title("FFN linearity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, per_layer: list[dict], directory: Path) -> list[Path]:
    return [plot_sinks(report, directory / "sinks.png"),
            plot_attention_vs_contribution(report, per_layer, directory / "attention_vs_contribution.png"),
            plot_ffn_linearity(report, directory / "ffn_linearity.png")]
