"""FFN approximation: exact recovery of a planted linear map, folding, rank, persistence."""

import pytest
import torch

from capa_export import CapaError, FfnApproximation, fit_ffn_approximation
from capa_export.inputs import builtin_samples, encode
from capa_export.models import adapter_for, load_model


class PlantedAffine(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, n):
        return n @ self.weight + self.bias


@pytest.fixture(scope="module")
def planted():
    """A tiny model whose layer-3 MLP *is* an affine map of its input n (and whose norm gain is
    not 1, so folding is exercised); layer 5 gets a rank-8 affine map."""
    model, processor = load_model("tiny-llava-random")
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(5)
    dim = adapter.hidden_size
    layers = model.model.language_model.layers
    with torch.no_grad():
        layers[3].post_attention_layernorm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
    full = PlantedAffine(torch.randn(dim, dim, generator=gen) / dim**0.5, torch.randn(dim, generator=gen))
    low = PlantedAffine(torch.randn(dim, 8, generator=gen) @ torch.randn(8, dim, generator=gen) / dim**0.5, torch.zeros(dim))
    layers[3].mlp, layers[5].mlp = full, low
    inputs = [encode(adapter, processor, s) for s in builtin_samples(4)]
    return model, adapter, inputs, full, low


def test_fit_recovers_a_planted_affine_map_and_folds_the_gain(planted):
    model, adapter, inputs, full, _ = planted
    approx = fit_ffn_approximation(model, inputs, [3], ridge=0.0, progress=False)
    fit = approx.layers[3]
    gain = model.model.language_model.layers[3].post_attention_layernorm.weight.detach()
    torch.testing.assert_close(fit.weight, gain[:, None] * full.weight, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fit.bias, full.bias, rtol=1e-3, atol=1e-3)
    assert fit.heldout_error < 1e-4 and fit.train_error < 1e-4


def test_rank_r_recovers_a_planted_low_rank_map(planted):
    model, _, inputs, _, low = planted
    exact = fit_ffn_approximation(model, inputs, [5], ridge=0.0, rank=8, progress=False).layers[5]
    assert exact.u.shape == (128, 8) and exact.v.shape == (8, 128)
    assert exact.heldout_error < 1e-4
    truncated = fit_ffn_approximation(model, inputs, [5], ridge=0.0, rank=4, progress=False).layers[5]
    assert truncated.heldout_error > 100 * max(exact.heldout_error, 1e-7)  # rank 4 cannot hold a rank-8 map


def test_auto_selects_layers_below_threshold(planted):
    model, _, inputs, _, _ = planted
    approx = fit_ffn_approximation(model, inputs, "auto", threshold=1e-3, layer_range=(2, 6), ridge=0.0, progress=False)
    assert 3 in approx.selected_layers and 5 in approx.selected_layers
    assert all(approx.layers[l].heldout_error < 1e-3 for l in approx.selected_layers)
    assert set(approx.layers) == {2, 3, 4, 5, 6}


def test_save_load_round_trip_and_refusals(planted, tmp_path):
    model, _, inputs, _, _ = planted
    approx = fit_ffn_approximation(model, inputs, [3, 5], rank=None, progress=False)
    approx.save(tmp_path)
    loaded = FfnApproximation.load(tmp_path, model)
    for layer in (3, 5):
        torch.testing.assert_close(loaded.layers[layer].weight, approx.layers[layer].weight)
        torch.testing.assert_close(loaded.layers[layer].bias, approx.layers[layer].bias)
    other, _ = load_model("tiny-llava-random")  # same architecture; its layer-0 o_proj is the same seed...
    with torch.no_grad():
        for layer in other.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(-1)  # ...so make it a different model
    with pytest.raises(CapaError, match="another model"):
        FfnApproximation.load(tmp_path, other)
    (tmp_path / "ffn_approx.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CapaError, match="unreadable"):
        FfnApproximation.load(tmp_path, model)


def test_no_visual_rows_is_a_clear_error(planted):
    model, adapter, _, _, _ = planted
    text_only = {"input_ids": torch.tensor([[1, 50, 60, 70]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(CapaError, match="no image tokens"):
        fit_ffn_approximation(model, [text_only], [3], progress=False)


def test_rank_r_is_nearly_as_good_as_full_rank_on_real_activations(tiny):
    """The rank-r map keeps the directions along which the prediction varies and refits the bias:
    on the tiny model's (offset-dominated) visual rows, rank 32 of 128 stays close to full rank."""
    model, processor = tiny
    adapter = adapter_for(model)
    inputs = [encode(adapter, processor, s) for s in builtin_samples(8)]
    full = fit_ffn_approximation(model, inputs, [2], progress=False).layers[2]
    low = fit_ffn_approximation(model, inputs, [2], rank=32, progress=False).layers[2]
    assert low.heldout_error < 2 * full.heldout_error


@pytest.mark.parametrize("count", [1, 2, 3])
def test_few_inputs_still_hold_rows_out(tiny, count):
    model, processor = tiny
    adapter = adapter_for(model)
    inputs = [encode(adapter, processor, s) for s in builtin_samples(count)]
    approx = fit_ffn_approximation(model, inputs, "auto", threshold=0.5, progress=False)
    assert approx.settings["heldout_rows"]["2"] > 0
    assert approx.selected_layers  # errors are finite, so "auto" can select


def test_fitting_in_layer_groups_gives_the_same_maps(tiny):
    model, processor = tiny
    adapter = adapter_for(model)
    inputs = [encode(adapter, processor, s) for s in builtin_samples(4)]
    whole = fit_ffn_approximation(model, inputs, [1, 2, 3], progress=False)
    one_layer = 2 * 129 * 129 * 8  # bytes of one layer's moments at D = 128
    grouped = fit_ffn_approximation(model, inputs, [1, 2, 3], memory_budget_bytes=one_layer, progress=False)
    for layer in (1, 2, 3):
        torch.testing.assert_close(grouped.layers[layer].weight, whole.layers[layer].weight)
        assert grouped.layers[layer].heldout_error == pytest.approx(whole.layers[layer].heldout_error)
