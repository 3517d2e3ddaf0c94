"""CapaConfig: what CAPA does to a model (pruning schedule, scoring, FFN approximation).

Every default below is one of the method's *choices* (docs/method.md); each is a field, documented, validated when the
config is made (model-independent limits) or when it is applied (limits that depend on the model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .method.scoring import VARIANTS
from .artifacts import write_json
from .errors import CapaError

QUERY_MODES = ("text", "last")
CONFIG_FILE = "capa_config.json"


@dataclass
class CapaConfig:
    """
    prune:         [(K, keep), ...] stages: score at layer K-1, keep the best visual tokens from layer
                   K on. keep is a count (an int >= 1) or a fraction of the input's N visual tokens
                   (a float in (0, 1]: k = round(fraction * N), at least 1; `keep_count`). Several
                   stages prune progressively (PyramidDrop style), each keeping fewer; a fraction is
                   always of the original N. [] = no pruning.
    variant:       the score: "contrib" (CAPA eq. 2), "value_norm", "attention" (FastV).
    queries:       which queries score: "text" = every token after the image, "last" = the final one.
    ffn_layers:    layers whose FFN is replaced by an affine map on visual rows: a list, or "auto"
                   (layers in ffn_range whose held-out relative error is below ffn_threshold).
    ffn_threshold: the relative-error bound for "auto".
    ffn_range:     [first, last] layers "auto" may choose from (inclusive); None = 1 .. L-2.
    ffn_ridge:     ridge lambda, relative to the mean diagonal of the Gram matrix (scale-free).
    ffn_rank:      optional rank r of the folded map (A ~= U V); None = full rank.
    prune_layout_tokens: whether image tokens that carry layout rather than content (LLaVA-NeXT's
                   row newlines; ModelFamily.layout_token_mask) are pruning candidates; False = they
                   stay in the sequence like text and only patch tokens are scored and dropped.
    """

    prune: list[tuple[int, int | float]] = field(default_factory=lambda: [(2, 64)])
    variant: str = "contrib"
    queries: str = "text"
    ffn_layers: list[int] | str = field(default_factory=list)
    ffn_threshold: float = 0.15
    ffn_range: tuple[int, int] | None = None
    ffn_ridge: float = 1e-3
    ffn_rank: int | None = None
    prune_layout_tokens: bool = False

    def __post_init__(self):
        self.prune = [self._stage(i, s) for i, s in enumerate(self.prune)]
        for (k_prev, keep_prev), (k_next, keep_next) in zip(self.prune, self.prune[1:]):
            if k_next <= k_prev:
                raise CapaError(f"prune stages must have strictly increasing layers; got layer {k_next} after {k_prev}")
            if isinstance(keep_next, float) != isinstance(keep_prev, float):
                # a fraction of N could exceed what an earlier count kept (or the reverse)
                raise CapaError(f"prune stages mix a count and a fraction ({describe_keep(keep_prev)} at layer "
                                f"{k_prev}, {describe_keep(keep_next)} at layer {k_next}); give all as counts or "
                                f"all as fractions")
            if keep_next >= keep_prev:
                raise CapaError(f"prune stage at layer {k_next} keeps {describe_keep(keep_next)}, which must be fewer "
                                f"than the {describe_keep(keep_prev)} kept by the stage at layer {k_prev}")
        if self.variant not in VARIANTS:
            raise CapaError(f"variant {self.variant!r} is unknown; expected one of {', '.join(VARIANTS)}")
        if self.queries not in QUERY_MODES:
            raise CapaError(f"queries {self.queries!r} is unknown; expected one of {', '.join(QUERY_MODES)}")
        if isinstance(self.ffn_layers, str):
            if self.ffn_layers != "auto":
                raise CapaError(f"ffn_layers {self.ffn_layers!r} must be a list of layer indices or 'auto'")
        else:
            layers = [int(x) for x in self.ffn_layers]
            if any(x < 0 for x in layers) or len(set(layers)) != len(layers):
                raise CapaError(f"ffn_layers {layers} must be distinct layer indices >= 0")
            self.ffn_layers = sorted(layers)
        if not 0 < float(self.ffn_threshold) < 1:
            raise CapaError(f"ffn_threshold {self.ffn_threshold} must be in (0, 1) (a relative error)")
        if self.ffn_range is not None:
            lo, hi = (int(x) for x in self.ffn_range)
            if not 0 <= lo <= hi:
                raise CapaError(f"ffn_range {list(self.ffn_range)} must be [first, last] with 0 <= first <= last")
            self.ffn_range = (lo, hi)
        if float(self.ffn_ridge) < 0:
            raise CapaError(f"ffn_ridge {self.ffn_ridge} must be >= 0")
        if not isinstance(self.prune_layout_tokens, bool):
            raise CapaError(f"prune_layout_tokens {self.prune_layout_tokens!r} must be true or false")
        if self.ffn_rank is not None and int(self.ffn_rank) <= 0:
            raise CapaError(f"ffn_rank {self.ffn_rank} must be a positive integer or None (full rank)")

    @staticmethod
    def _stage(index, stage) -> tuple[int, int | float]:
        try:
            layer, keep = stage
            if isinstance(layer, bool) or isinstance(keep, bool) or int(layer) != layer:
                raise TypeError
            layer = int(layer)
            if not isinstance(keep, (int, float)):
                raise TypeError
        except (TypeError, ValueError):
            raise CapaError(f"prune[{index}] = {stage!r} must be a (layer K, keep) pair: K an integer, keep a "
                            f"count (integer) or a fraction (0 < f <= 1)") from None
        if layer < 1:
            raise CapaError(f"prune[{index}] layer K={layer} must be >= 1 (scoring uses layer K-1)")
        if isinstance(keep, float):
            if not 0 < keep <= 1:
                raise CapaError(f"prune[{index}] keep fraction {keep} must be in (0, 1] (or give a count, an integer "
                                f">= 1)")
            return layer, keep
        if keep <= 0:
            raise CapaError(f"prune[{index}] keep k={keep} must be >= 1")
        return layer, int(keep)

    # --- limits that depend on the model and the input ----------------------------------------
    def check_for_model(self, num_layers: int) -> None:
        for layer, _ in self.prune:
            if layer >= num_layers:
                raise CapaError(f"prune layer K={layer} is outside the decoder: must be in [1, {num_layers - 1}]")
        if isinstance(self.ffn_layers, list):
            bad = [x for x in self.ffn_layers if x >= num_layers]
            if bad:
                raise CapaError(f"ffn_layers {bad} are outside the decoder: must be in [0, {num_layers - 1}]")
        if self.ffn_range is not None and self.ffn_range[1] >= num_layers:
            raise CapaError(f"ffn_range {list(self.ffn_range)} is outside the decoder: last must be <= {num_layers - 1}")

    def check_for_visual_tokens(self, num_visual: int) -> None:
        """A count above the input's visual tokens is refused (a fraction always fits)."""
        for layer, keep in self.prune:
            if not isinstance(keep, float) and keep > num_visual:
                raise CapaError(f"prune stage at layer {layer} keeps k={keep} but the input has only {num_visual} "
                                f"visual tokens: k must be in [1, {num_visual}]")

    def resolved_ffn_range(self, num_layers: int) -> tuple[int, int]:
        return self.ffn_range if self.ffn_range is not None else (1, num_layers - 2)

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["prune"] = [list(s) for s in self.prune]
        data["ffn_range"] = list(self.ffn_range) if self.ffn_range is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CapaConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CapaError(f"CapaConfig has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CapaConfig":
        """From capa_config.json (or a directory holding it): bounded strict JSON, schema-checked
        (types, known keys), then the config's own range checks."""
        import os

        from .folders import read_json
        from .schemas import CAPA_CONFIG

        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not os.path.lexists(path):
            raise CapaError(f"CAPA config {path} does not exist; give a directory made by `capa-export calibrate`")
        return cls.from_dict(read_json(path, max_bytes=1 << 20, schema=CAPA_CONFIG, name=f"CAPA config {path}"))

    def describe(self) -> str:
        prune = ", ".join(f"keep {describe_keep(k)} from layer {K}" for K, k in self.prune) or "no pruning"
        ffn = self.ffn_layers if self.ffn_layers else "none"
        rank = f", rank {self.ffn_rank}" if self.ffn_rank else ""
        return f"{prune}; score {self.variant} over {self.queries} queries; FFN approximation: {ffn}{rank}"


def keep_fraction(keep: float) -> tuple[int, int]:
    """A keep fraction as the ratio p/q it stands for (denominator <= 10000): k is computed from N
    with integers only, so PyTorch and every ONNX runtime get the same k."""
    from fractions import Fraction

    ratio = Fraction(keep).limit_denominator(10000)
    return ratio.numerator, ratio.denominator


def keep_count(keep, num_visual):
    """k for `keep` of num_visual visual tokens: a count as is; a fraction f -> round(f * N), halves
    up, at least 1. Works on ints and on torch.export's symbolic sizes (the exported prefill
    computes k from N inside the graph)."""
    if not isinstance(keep, float):
        return keep
    import torch

    p, q = keep_fraction(keep)
    return torch.sym_max((p * num_visual + q // 2) // q, 1)


def describe_keep(keep) -> str:
    return f"{keep:.4g} of the visual tokens" if isinstance(keep, float) else f"{keep} visual tokens"
