"""FFN approximation of visual tokens (docs/method.md, "FFN approximation").

For a layer l, FFN_l(n) ~= n A_l + b_l on visual rows, n = the post-attention RMSNorm output.
Fitted by ridge least squares in float64 from sufficient statistics (X^T X, X^T Y, Y^T Y are
accumulated per layer, so memory is O(D^2) per layer whatever the number of calibration rows, and
the held-out error is computed from the held-out statistics without keeping any row).
The norm's gain is folded in (A' = diag(gamma) A), so the exported block is
RMS-normalise -> MatMul + Add (or two MatMuls at rank r) -> residual add.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import write_json
from ..errors import CapaError
from ..logs import Progress
from ..models import adapter_for, fingerprints_match

WEIGHTS_FILE = "ffn_approx.safetensors"
META_FILE = "ffn_approx.json"
FORMAT_VERSION = 1


class _Moments:
    """Running X^T X, X^T Y, tr(Y^T Y), with X = [n, 1] (the bias column), in float64."""

    def __init__(self, dim: int, out_dim: int):
        self.xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
        self.xty = torch.zeros(dim + 1, out_dim, dtype=torch.float64)
        self.yty = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x.double().cpu(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        y = y.double().cpu()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += float((y * y).sum())
        self.rows += x.shape[0]

    def relative_error(self, weight: torch.Tensor) -> float:
        """||Y - X W||_F / ||Y||_F over the accumulated rows, from the moments alone."""
        if self.rows == 0 or self.yty == 0:
            return float("nan")
        residual = self.yty - 2 * float((weight * self.xty).sum()) + float((weight * (self.xtx @ weight)).sum())
        return max(residual, 0.0) ** 0.5 / self.yty**0.5


@dataclass
class LayerFit:
    weight: torch.Tensor  # A' [D, D]: folded (applies to the RMS-normalised input without gain)
    bias: torch.Tensor  # [D]
    u: torch.Tensor | None = None  # rank r: A' ~= U V, U [D, r]
    v: torch.Tensor | None = None  # V [r, D]
    train_error: float = float("nan")
    heldout_error: float = float("nan")
    text_error: float = float("nan")  # the same map applied to text rows (informative)

    def apply(self, normalised: torch.Tensor) -> torch.Tensor:
        if self.u is not None:
            return (normalised @ self.u.to(normalised.dtype)) @ self.v.to(normalised.dtype) + self.bias.to(normalised.dtype)
        return normalised @ self.weight.to(normalised.dtype) + self.bias.to(normalised.dtype)


@dataclass
class FfnApproximation:
    layers: dict[int, LayerFit]
    selected_layers: list[int]
    fingerprint: dict
    settings: dict = field(default_factory=dict)

    def apply(self, layer: int, normalised: torch.Tensor) -> torch.Tensor:
        fit = self.layers[layer]
        if fit.weight.device != normalised.device:
            self.layers[layer] = fit = _to_device(fit, normalised.device)
        return fit.apply(normalised)

    def cast(self, dtype: torch.dtype) -> "FfnApproximation":
        """A copy whose maps are stored in `dtype` (for export in that dtype)."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        layers = {l: LayerFit(cast(f.weight), cast(f.bias), cast(f.u), cast(f.v), f.train_error, f.heldout_error,
                              f.text_error) for l, f in self.layers.items()}
        return FfnApproximation(layers, list(self.selected_layers), self.fingerprint, dict(self.settings))

    def check_model(self, adapter) -> None:
        problem = fingerprints_match(self.fingerprint, adapter.fingerprint())
        if problem:
            raise CapaError(f"the FFN approximation was fitted on another model: {problem}; "
                            f"run `capa-export calibrate` for this model")

    def errors(self) -> dict[int, dict[str, float]]:
        return {l: {"train": f.train_error, "heldout": f.heldout_error, "text": f.text_error}
                for l, f in sorted(self.layers.items())}

    # --- persistence: safetensors for tensors, JSON for the rest --------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer, fit in self.layers.items():
            tensors[f"layers.{layer}.weight"] = fit.weight.float().contiguous().cpu()
            tensors[f"layers.{layer}.bias"] = fit.bias.float().contiguous().cpu()
            if fit.u is not None:
                tensors[f"layers.{layer}.u"] = fit.u.float().contiguous().cpu()
                tensors[f"layers.{layer}.v"] = fit.v.float().contiguous().cpu()
        meta = {
            "format_version": FORMAT_VERSION,
            "layout": "y = rms_normalize(x) @ weight + bias (gain folded; weight is [D_in, D_out]); "
                      "rank r: y = (rms_normalize(x) @ u) @ v + bias",
            "selected_layers": self.selected_layers,
            "errors": {str(l): e for l, e in self.errors().items()},
            "fingerprint": self.fingerprint,
            "settings": self.settings,
        }
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "capa-ffn-approx"})
        write_json(directory / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model=None) -> "FfnApproximation":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..folders import read_json
        from ..schemas import FFN_APPROXIMATION

        directory = Path(directory)
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        for path in (meta_path, weights_path):
            if not os.path.lexists(path):
                raise CapaError(f"FFN approximation file {path} is missing; run `capa-export calibrate --out {directory}`")
        # bounded strict JSON with its schema; the weights are safetensors (no code, a bounded header)
        meta = read_json(meta_path, max_bytes=16 << 20, schema=FFN_APPROXIMATION, name=str(meta_path))
        if not weights_path.is_file() or weights_path.is_symlink():
            raise CapaError(f"FFN approximation file {weights_path} is not a regular file; calibrate again")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CapaError(f"FFN approximation in {directory} is unreadable ({str(exc).splitlines()[0][:120]}); "
                            f"calibrate again") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CapaError(f"FFN approximation in {directory} has format {meta.get('format_version')}, "
                            f"this tool reads {FORMAT_VERSION}")
        layers = {}
        for key, errors in meta["errors"].items():
            layer = int(key)
            get = lambda name: tensors.get(f"layers.{layer}.{name}")  # noqa: E731
            if get("weight") is None or get("bias") is None:
                raise CapaError(f"FFN approximation in {directory} lacks tensors for layer {layer}")
            number = lambda x: float("nan") if x is None else float(x)  # noqa: E731  (null = not measured)
            layers[layer] = LayerFit(get("weight"), get("bias"), get("u"), get("v"),
                                     number(errors["train"]), number(errors["heldout"]), number(errors["text"]))
        approx = cls(layers, list(meta["selected_layers"]), meta["fingerprint"], meta.get("settings", {}))
        if model is not None:
            adapter = adapter_for(model)
            approx.check_model(adapter)
            dim = adapter.hidden_size
            for layer, fit in layers.items():
                if layer >= adapter.num_layers or tuple(fit.weight.shape) != (dim, dim) or tuple(fit.bias.shape) != (dim,):
                    raise CapaError(f"FFN approximation layer {layer} has weight {tuple(fit.weight.shape)}; the model "
                                    f"needs ({dim}, {dim}) for layers below {adapter.num_layers}")
            approx.layers = {l: _to_device(f, adapter.lm_head.weight.device) for l, f in layers.items()}
        return approx


def select_layers(fits: dict[int, LayerFit], threshold: float, layer_range: tuple[int, int]) -> list[int]:
    """The layers in range whose held-out relative error is below the threshold."""
    lo, hi = layer_range
    return [l for l, f in sorted(fits.items()) if lo <= l <= hi and f.heldout_error < threshold]


def _to_device(fit: LayerFit, device) -> LayerFit:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return LayerFit(move(fit.weight), move(fit.bias), move(fit.u), move(fit.v),
                    fit.train_error, fit.heldout_error, fit.text_error)


def _input_mean_and_covariance(moments: _Moments) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(moments.rows, 1)
    mean = moments.xtx[-1, :-1] / n  # the bias column is all ones: its row holds the input sums
    return mean, moments.xtx[:-1, :-1] / n - torch.outer(mean, mean)


def ridge_solve(moments: _Moments, ridge: float) -> torch.Tensor:
    """W [D+1, D_out] minimising ||Y - X W||^2 + lambda ||A||^2 (the bias row is not penalised).

    lambda = ridge * rows * mean input *variance* (centred: visual rows share a large common
    offset, and the uncentred second moment would mostly measure that), so `ridge` means the same
    at any activation scale.
    """
    dim = moments.xtx.shape[0] - 1
    _, covariance = _input_mean_and_covariance(moments)
    scale = float(torch.diagonal(covariance).mean()) * moments.rows if dim else 0.0
    penalty = torch.zeros_like(moments.xtx)
    penalty.diagonal()[:dim] = ridge * scale
    return torch.linalg.lstsq(moments.xtx + penalty, moments.xty).solution


def reduce_rank(weight: torch.Tensor, moments: _Moments, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: keep the r output directions that carry most of the *variation* of
    the prediction (top eigenvectors P of A^T Cov(x) A), A_r = A P P^T, and refit the bias so the
    mean prediction is unchanged (b_r = b + mean(x) (A - A_r)). Optimal rank-r for the calibration
    data, not merely for the matrix. Returns U = A P [D, r], V = P^T [r, D], b_r [D]."""
    a, b = weight[:-1], weight[-1]
    mean, covariance = _input_mean_and_covariance(moments)
    _, vectors = torch.linalg.eigh(a.T @ covariance @ a)
    top = vectors[:, -rank:]  # [D_out, r]
    a_r = a @ top @ top.T
    return a @ top, top.T, b + mean @ (a - a_r)


def collect_moments(model, inputs, layers, *, holdout_every: int = 4, with_text: bool = False, progress: bool = True):
    """Run the unpruned model on each input and accumulate per-layer moments of
    (post-attention norm output, FFN output) over visual rows: train / held-out split by input
    (every `holdout_every`-th input is held out; with fewer inputs than that, every other row of
    each input, so something is always held out)."""
    from ..config import CapaConfig
    from .capa_model import CapaModel

    capa = CapaModel(model, CapaConfig(prune=[]))
    adapter = capa.adapter
    dim = adapter.hidden_size
    layers = sorted(set(layers))
    train = {l: _Moments(dim, dim) for l in layers}
    held = {l: _Moments(dim, dim) for l in layers}
    text = {l: _Moments(dim, dim) for l in layers} if with_text else {}
    inputs = list(inputs)
    split_rows = len(inputs) < holdout_every
    state = {"heldout": False}

    def collector(layer, normed, ffn_out, is_visual):
        x, y = normed[is_visual], ffn_out[is_visual]
        if split_rows:
            train[layer].add(x[0::2], y[0::2])
            held[layer].add(x[1::2], y[1::2])
        else:
            (held if state["heldout"] else train)[layer].add(x, y)
        if with_text:
            text[layer].add(normed[~is_visual], ffn_out[~is_visual])

    capa.collector = collector
    capa.collect_layers = set(layers)
    for i, batch in enumerate(Progress(inputs, "calibrating", "input", enabled=progress)):
        state["heldout"] = (i % holdout_every) == holdout_every - 1
        capa(**batch)
    return train, held, text


def _fit_layer(adapter, layer: int, train: _Moments, held: _Moments, text: _Moments | None, ridge: float,
               rank: int | None) -> LayerFit:
    if train.rows == 0:
        raise CapaError("the calibration inputs hold no image tokens; give inputs with images")
    weight = ridge_solve(train, ridge)
    u = v = None
    if rank is not None:
        u, v, bias = reduce_rank(weight, train, rank)
        weight = torch.cat([u @ v, bias[None]], dim=0)
    gain = adapter.norm_gain(adapter.layer(layer).post_attention_norm).detach().double().cpu()
    return LayerFit(
        weight=(gain[:, None] * weight[:-1]).float(),  # A' = diag(gamma) A
        bias=weight[-1].float(),
        u=None if u is None else (gain[:, None] * u).float(),
        v=None if v is None else v.float(),
        train_error=train.relative_error(weight),
        heldout_error=held.relative_error(weight),
        text_error=text.relative_error(weight) if text is not None else float("nan"),
    )


def fit_ffn_approximation(
    model,
    calibration_inputs,
    layers="auto",
    *,
    ridge: float = 1e-3,
    rank: int | None = None,
    threshold: float = 0.15,
    layer_range: tuple[int, int] | None = None,
    holdout_every: int = 4,
    text_errors: bool = False,
    memory_budget_bytes: int = 4 << 30,
    progress: bool = True,
) -> FfnApproximation:
    """Fit FFN_l(n) ~= n A_l + b_l on visual rows for each layer (a list, or "auto": every layer in
    `layer_range`, selecting those whose held-out relative error is below `threshold`).

    calibration_inputs: an iterable of processor-output dicts, e.g.
    `[inputs.encode(adapter, processor, s) for s in samples]`. `text_errors` also measures
    the map on text rows (for the analysis; one more D x D moment per layer).
    Memory: two (three with text_errors) (D+1) x D float64 moments per layer: layers are fitted
    in groups that fit `memory_budget_bytes` (at D = 4096, ~5 layers per pass over the inputs).
    """
    adapter = adapter_for(model)
    num_layers = adapter.num_layers
    if layers == "auto":
        lo, hi = layer_range if layer_range is not None else (1, num_layers - 2)
        candidates = list(range(lo, hi + 1))
    else:
        candidates = sorted(int(x) for x in layers)
    bad = [l for l in candidates if not 0 <= l < num_layers]
    if bad:
        raise CapaError(f"FFN approximation layers {bad} are outside the decoder: must be in [0, {num_layers - 1}]")
    if rank is not None and not 0 < rank <= adapter.hidden_size:
        raise CapaError(f"ffn rank {rank} must be in [1, {adapter.hidden_size}] (the hidden size)")
    dim = adapter.hidden_size
    per_layer = (3 if text_errors else 2) * (dim + 1) * (dim + 1) * 8
    group = max(1, memory_budget_bytes // per_layer)
    calibration_inputs = list(calibration_inputs)
    fits, rows = {}, {}
    for start in range(0, len(candidates), group):
        train, held, text = collect_moments(model, calibration_inputs, candidates[start:start + group],
                                            holdout_every=holdout_every, with_text=text_errors, progress=progress)
        for layer in train:
            fits[layer] = _fit_layer(adapter, layer, train[layer], held[layer], text.get(layer), ridge, rank)
            rows[layer] = (train[layer].rows, held[layer].rows)
    if layers == "auto":
        selected = select_layers(fits, threshold, (candidates[0], candidates[-1]))
    else:
        selected = candidates
    settings = {"ridge": ridge, "rank": rank, "threshold": threshold, "layer_range": layer_range,
                "candidates": candidates, "train_rows": {str(l): r[0] for l, r in rows.items()},
                "heldout_rows": {str(l): r[1] for l, r in rows.items()}}
    return FfnApproximation(fits, selected, adapter.fingerprint(), settings)
