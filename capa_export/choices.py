"""One command, real choices: the pruning schedule `build` uses, from what the user gave.

    --prune K:k [K:k ...]   these stages
    --prune none            no pruning
    --prune auto            analyze's suggested layer K and FFN range: from --analysis DIR (a report
                            `analyze` wrote for this model), else from an analysis run now
    --keep N                the k of the single stage (layer 2 by default, K with auto): a count,
                            or a fraction of each image's visual tokens (0.25)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import CapaError

#: the layer the default single stage prunes at (CapaConfig's default schedule)
DEFAULT_PRUNE_LAYER = 2
DEFAULT_KEEP = 64
#: the model fields an analysis report must share with the model being built
COMPARED = ("model_type", "num_layers", "hidden_size")


@dataclass
class Suggestion:
    """What an analysis suggests: prune at `layer` keeping `keep`, approximate FFNs within ffn_range."""
    layer: int
    keep: int
    ffn_range: tuple[int, int] | None
    source: str


def check_choice(prune, keep: int | None) -> None:
    """Refuse, before any work, a combination that says two things."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float))
                             or (isinstance(keep, int) and keep < 1)
                             or (isinstance(keep, float) and not 0 < keep <= 1)):
        raise CapaError(f"--keep {keep!r} must be a count of visual tokens >= 1, or a fraction in (0, 1]")
    if keep is not None and isinstance(prune, list) and prune:
        raise CapaError(f"--keep {keep} and --prune {' '.join(f'{a}:{b}' for a, b in prune)} both give k: give the "
                        f"stages with --prune, or one stage's k with --keep")
    if keep is not None and prune == []:
        raise CapaError(f"--keep {keep} with --prune none: nothing is pruned, so nothing is kept; drop one of them")


def read_suggestion(analysis_dir: str | Path, fingerprint: dict | None = None) -> Suggestion:
    """The suggestion in an `analyze` folder's report.json (read as untrusted: size-capped, every
    field type-checked); with fingerprint, the analysis must be of that model."""
    from .manifest import ANALYSIS, read_json_manifest

    report = read_json_manifest(Path(analysis_dir), ANALYSIS, "an analyze folder")
    where = f"{analysis_dir}/{ANALYSIS.file}"
    suggested = report.get("suggested") if isinstance(report, dict) else None
    settings = report.get("settings") if isinstance(report, dict) else None
    if not isinstance(suggested, dict) or not isinstance(settings, dict):
        raise CapaError(f"{where} has no 'suggested' and 'settings' objects; run `capa-export analyze` again")
    layer, keep, ffn_range = suggested.get("prune_layer"), settings.get("keep"), suggested.get("ffn_range")
    if not _whole(layer) or not _whole(keep) or layer < 1 or keep < 1:
        raise CapaError(f"{where}: suggested.prune_layer and settings.keep must be whole numbers >= 1 (got "
                        f"{str(layer)[:20]}, {str(keep)[:20]})")
    if ffn_range is not None and not (isinstance(ffn_range, list) and len(ffn_range) == 2
                                      and all(_whole(v) for v in ffn_range) and 0 <= ffn_range[0] <= ffn_range[1]):
        raise CapaError(f"{where}: suggested.ffn_range must be null or [first, last] layers (got {str(ffn_range)[:40]})")
    if fingerprint is not None and isinstance(report.get("model"), dict):
        for key in COMPARED:  # the fields a report stores as plain JSON values
            value = fingerprint.get(key)
            if key in report["model"] and value is not None and report["model"][key] != value:
                raise CapaError(f"{where} is an analysis of another model ({key} {str(report['model'][key])[:40]}, "
                                f"this model: {str(value)[:40]}); analyze this model, or leave --analysis out")
    return Suggestion(layer, keep, tuple(ffn_range) if ffn_range else None, where)


def suggestion_from_report(report: dict, source: str) -> Suggestion:
    suggested = report["suggested"]
    ffn_range = suggested["ffn_range"]
    return Suggestion(suggested["prune_layer"], report["settings"]["keep"], tuple(ffn_range) if ffn_range else None,
                      source)


def stages(prune, keep: int | None, suggestion: Suggestion | None = None) -> list[tuple[int, int]] | None:
    """The schedule: None = the calibrated/profile one unless keep says otherwise."""
    if prune == "auto":
        return [(suggestion.layer, keep if keep is not None else suggestion.keep)]
    if prune is None:
        return None if keep is None else [(DEFAULT_PRUNE_LAYER, keep)]
    return list(prune)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
