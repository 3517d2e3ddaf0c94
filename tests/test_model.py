"""The CapaModel against independent references: the HF model's own forward / generate, and the
HF model's own decoder layers run on the sequence with the dropped tokens removed."""

import pytest
import torch

from capa_export import CapaConfig, apply_capa
from capa_export.errors import CapaError
from capa_export.models import adapter_for

from .conftest import brute_force_scores


def visual_count(model, batch) -> int:
    return int((batch["input_ids"][0] == adapter_for(model).image_token_id).sum())


def hf_layer_outputs(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, output_attentions=True)


def causal_mask(length, dtype):
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


class VisualRowsAffine(torch.nn.Module):
    """An MLP stand-in: the fitted affine map on visual rows, the original MLP on the others."""

    def __init__(self, original, fit, gain, is_visual):
        super().__init__()
        self.original, self.fit, self.gain, self.is_visual = original, fit, gain, is_visual

    def forward(self, normed):
        affine = (normed / self.gain) @ self.fit.weight + self.fit.bias  # undo the gain: the map is folded
        return torch.where(self.is_visual[..., None], affine, self.original(normed))


def hf_decoder_inputs(model, batch):
    """The merged embeddings and rotary positions the HF model's own forward hands its decoder
    (captured by a hook on the decoder module: HF's merge and position code, not ours)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = adapter_for(model).text_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    embeds, positions = captured["inputs_embeds"], captured.get("position_ids")
    if positions is None:  # the decoder makes 0..L-1 itself
        positions = torch.arange(embeds.shape[1])[None]
    return embeds, positions


def hf_reference(model, batch, stages, ffn=None, extra_ids=None):
    """Logits from HF's own layers. `stages` maps a layer K to the original visual-token indices
    kept from K on: before K the layers see every token; at K the others are dropped (positions
    gathered, not renumbered). `ffn` = (approximation, layers): those MLPs use the affine map on
    visual rows. `extra_ids` are appended tokens (decoding, recomputed in full)."""
    adapter = adapter_for(model)
    lm = adapter.text_model
    if extra_ids is not None:
        # generated tokens are real text tokens: ids appended, mask 1, any other per-token processor
        # output (e.g. Qwen-VL's mm_token_type_ids) 0 = text
        appended = {"input_ids": extra_ids, "attention_mask": torch.ones_like(extra_ids)}
        batch = {**batch, **{key: torch.cat([batch[key], appended.get(key, torch.zeros_like(extra_ids))], dim=1)
                             for key in adapter.family.text_keys if key in batch}}
    ids = batch["input_ids"]
    embeds, all_positions = hf_decoder_inputs(model, batch)
    with torch.no_grad():
        is_visual = ids[0] == adapter.image_token_id
        visual_number = torch.cumsum(is_visual.long(), 0) - 1  # which visual token each slot holds
        current = torch.arange(ids.shape[1])  # original index of each position still present
        hidden = embeds
        for index, layer in enumerate(lm.layers):
            if index in stages:
                kept = set(int(x) for x in stages[index])
                keep = torch.tensor([not is_visual[p] or int(visual_number[p]) in kept for p in current.tolist()])
                hidden, current = hidden[:, keep], current[keep]
            positions = all_positions[..., current]
            cos_sin = lm.rotary_emb(hidden, positions)
            original_mlp = layer.mlp
            if ffn is not None and index in ffn[1]:
                layer.mlp = VisualRowsAffine(original_mlp, ffn[0].layers[index], layer.post_attention_layernorm.weight,
                                             is_visual[current][None])
            try:
                hidden = layer(hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                               position_ids=positions, position_embeddings=cos_sin)
            finally:
                layer.mlp = original_mlp
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return adapter.lm_head(lm.norm(hidden))


def test_unpruned_equals_hf_forward(tiny, tiny_batch):
    model, _ = tiny
    with torch.no_grad():
        expected = model(**tiny_batch).logits
    out = apply_capa(model, CapaConfig(prune=[]))(**tiny_batch)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.keep_indices.shape == (1, int((tiny_batch["input_ids"] == adapter_for(model).image_token_id).sum()))


def test_unpruned_greedy_decoding_equals_hf_generate(tiny, tiny_batch):
    model, _ = tiny
    with torch.no_grad():
        expected = model.generate(**tiny_batch, max_new_tokens=6, do_sample=False)[:, tiny_batch["input_ids"].shape[1]:]
    tokens, _ = apply_capa(model, CapaConfig(prune=[])).generate(**tiny_batch, max_new_tokens=6)
    assert tokens.tolist() == expected.tolist()


@pytest.mark.parametrize("variant", ["contrib", "value_norm", "attention"])
def test_pruned_keep_set_equals_brute_force_on_hf_attention(tiny, tiny_batch, variant):
    """The kept tokens are the top-k of the float64 score computed from HF's own attention
    probabilities and values at layer K-1, over the text queries after the image."""
    model, _ = tiny
    prune_layer, keep = 3, 48
    hf = hf_layer_outputs(model, tiny_batch)
    probs = hf.attentions[prune_layer - 1]  # [1, H, L, L]
    ids = tiny_batch["input_ids"][0]
    visual = (ids == adapter_for(model).image_token_id).nonzero()[:, 0]
    queries = torch.arange(int(visual[-1]) + 1, ids.shape[0])
    layer = adapter_for(model).layer(prune_layer - 1)
    with torch.no_grad():
        normed = layer.input_norm(hf.hidden_states[prune_layer - 1])
        values = layer.v_proj(normed).view(1, -1, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    scores = brute_force_scores(probs[:, :, queries][..., visual], values[:, :, visual], layer.o_proj.weight, variant)
    expected = torch.sort(torch.topk(scores[0], keep).indices).values
    out = apply_capa(model, CapaConfig(prune=[(prune_layer, keep)], variant=variant))(**tiny_batch)
    assert out.keep_indices[0].tolist() == expected.tolist()


@pytest.mark.parametrize("prune", [[(2, 64)], [(1, 192), (4, 32)]])
def test_pruned_logits_equal_hf_layers_on_the_reduced_sequence(tiny, tiny_batch, prune):
    model, _ = tiny
    out = apply_capa(model, CapaConfig(prune=prune))(**tiny_batch)
    stages = {layer: kept[0] for (layer, _), kept in zip(prune, out.stage_keep_indices)}
    expected = hf_reference(model, tiny_batch, stages)
    n, vocab = visual_count(model, tiny_batch), adapter_for(model).vocab_size
    assert out.logits.shape == expected.shape == (1, tiny_batch["input_ids"].shape[1] - n + prune[-1][1], vocab)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
    # a later stage keeps a subset of an earlier one
    if len(prune) == 2:
        assert set(out.stage_keep_indices[1][0].tolist()) <= set(out.stage_keep_indices[0][0].tolist())


def test_pruned_decoding_matches_recomputation(tiny, tiny_batch):
    """KV cache: layers < K keep the full length, >= K the pruned one; decoding must give what a
    full recomputation (same kept tokens, generated tokens appended) gives."""
    model, _ = tiny
    capa = apply_capa(model, CapaConfig(prune=[(2, 64)]))
    tokens, prefill = capa.generate(**tiny_batch, max_new_tokens=5)
    cache = prefill.past_key_values
    assert cache.length(0) == cache.length(1) == tiny_batch["input_ids"].shape[1] + 4
    assert cache.length(2) == tiny_batch["input_ids"].shape[1] - visual_count(model, tiny_batch) + 64 + 4
    logits = hf_reference(model, tiny_batch, {2: prefill.keep_indices[0]}, extra_ids=tokens[:, :-1])
    assert logits[0, -5:].argmax(-1).tolist() == tokens[0].tolist()


def test_ffn_approximation_applies_to_visual_rows_only(tiny, tiny_batch):
    from capa_export import fit_ffn_approximation

    model, _ = tiny
    approx = fit_ffn_approximation(model, [tiny_batch], [3, 4], progress=False)
    out = apply_capa(model, CapaConfig(prune=[(2, 64)], ffn_layers=[3, 4]), approx)(**tiny_batch)
    expected = hf_reference(model, tiny_batch, {2: out.keep_indices[0]}, ffn=(approx, [3, 4]))
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
    plain = apply_capa(model, CapaConfig(prune=[(2, 64)]))(**tiny_batch)
    assert (out.logits - plain.logits).abs().max() > 1e-4  # the approximation did change something


def test_k_larger_than_visual_tokens_is_refused_when_applied(tiny, tiny_batch):
    model, _ = tiny
    n = visual_count(model, tiny_batch)
    with pytest.raises(CapaError, match=f"k={n + 24}.*{n}"):
        apply_capa(model, CapaConfig(prune=[(2, n + 24)]))(**tiny_batch)


def test_prune_layer_outside_decoder_is_refused(tiny):
    model, _ = tiny
    layers = adapter_for(model).num_layers
    with pytest.raises(CapaError, match=f"K={layers} is outside the decoder"):
        apply_capa(model, CapaConfig(prune=[(layers, 64)]))


def test_right_padding_is_refused(tiny, tiny_batch):
    model, _ = tiny
    mask = tiny_batch["attention_mask"].clone()
    mask[:, -2:] = 0
    with pytest.raises(CapaError, match="right padding"):
        apply_capa(model, CapaConfig())(**{**tiny_batch, "attention_mask": mask})


def test_batch_of_two_images_with_left_padding_matches_rows_run_alone(tiny, tiny_batch):
    """Per-row bookkeeping: each row keeps its own tokens; a left-padded row gives the same
    last-token logits and kept set as the same prompt alone."""
    from capa_export.inputs import synthetic_image

    model, processor = tiny
    capa = apply_capa(model, CapaConfig(prune=[(2, 64)]))
    questions = ["What?", "What is in the picture? Answer in detail."]
    images = [synthetic_image(1), synthetic_image(3)]
    batch = capa.family.encode(processor, images, questions)
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    out = capa(**batch, last_logits_only=True)
    for row, (image, question) in enumerate(zip(images, questions)):
        single = capa(**capa.family.encode(processor, [image], [question]), last_logits_only=True)
        assert out.keep_indices[row].tolist() == single.keep_indices[0].tolist()
        torch.testing.assert_close(out.logits[row, -1], single.logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_scoring_rows_equal_the_rows_of_the_full_softmax_in_float64(kv_heads):
    """The exported scoring layer recomputes only the rows it scores with (ScoringRows); they must be
    the rows of the layer's full attention probabilities, here computed in float64 by hand with
    the keys repeated per query head (grouped-query) and a causal + left-padding mask."""
    from capa_export.method.capa_model import ScoringRows, additive_mask

    torch.manual_seed(0)
    batch, heads, length, dim, first = 2, 4, 9, 8, 5
    q = torch.randn(batch, heads, length, dim)
    k = torch.randn(batch, kv_heads, length, dim)
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, :2] = 0
    mask = additive_mask(padding, length, torch.float32)
    scale = dim ** -0.5
    k64 = k.double().repeat_interleave(heads // kv_heads, dim=1)
    logits = (q.double() @ k64.transpose(-1, -2)) * scale
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & padding.bool()[:, None, None, :]
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)[:, :, first:]
    rows = ScoringRows(q, k, mask, scale).rows(first)
    assert rows.shape == (batch, heads, length - first, length)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)


def float64_attention(q, k, v, padding, scale):
    """Causal attention with left padding in float64, keys and values repeated per query head; a
    padding query row sees itself only (the mask's rule for rows whose output is never read)."""
    length = q.shape[2]
    group = q.shape[1] // k.shape[1]
    k64, v64 = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    logits = (q.double() @ k64.transpose(-1, -2)) * scale
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None]
    real = padding.bool()
    allowed = (causal & real[:, None, None, :]) | (torch.eye(length, dtype=torch.bool)[None, None]
                                                   & ~real[:, None, :, None])
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ v64


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("blocks", [1, 3, 8, 12])
def test_blocked_attention_equals_float64_attention_on_every_row(kv_heads, blocks):
    """The prefill's attention as query blocks (`blocked_attention`, what the exported graph runs
    before pruning) against float64 by hand, on every row including padding rows (their KV is part
    of the cache an engine returns): 9 rows in 3 blocks of 3, 8 blocks of 1-2 and 12 blocks, some empty."""
    from capa_export.method.capa_model import additive_mask, blocked_attention

    torch.manual_seed(1)
    batch, heads, length, dim = 2, 4, 9, 8
    q, k, v = torch.randn(batch, heads, length, dim), *torch.randn(2, batch, kv_heads, length, dim)
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, :3] = 0
    mask = additive_mask(padding, length, torch.float32)
    out = blocked_attention(q, k, v, mask, blocks, heads, kv_heads, dim ** -0.5)
    assert out.shape == (batch, heads, length, dim)
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, padding, dim ** -0.5), rtol=1e-5, atol=1e-6)


def test_a_padding_row_attends_to_itself_only():
    from capa_export.method.capa_model import additive_mask

    padding = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    visible = additive_mask(padding, 4, torch.float32)[:, 0] == 0
    assert visible[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    assert visible[1].tolist() == torch.tril(torch.ones(4, 4, dtype=torch.bool)).tolist()
