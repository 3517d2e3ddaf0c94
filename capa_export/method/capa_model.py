"""CapaModel: the decoder run layer by layer with contribution pruning and FFN approximation.

This is the reference every export and engine is validated against, so it is written for
clarity: explicit attention (scores, float32 softmax as the HF eager path does, values), and no
fused kernels; the scoring layer's probabilities are recomputed for the scoring rows (ScoringRows),
as the exported graph does.

Sequence bookkeeping, per row b:
- `visual_slots[b]`   indices, in the current sequence, of the visual tokens still present;
- `visual_ids[b]`     which original visual token (0..N-1) each of those is;
- `positions`         rotary positions, gathered (never renumbered) when tokens are dropped;
- `padding_mask`      1 for real tokens, gathered alongside.
Layers before the first pruning layer see the full sequence; a stage (K, k) keeps the k best
visual tokens, scored from layer K-1's attention, and layers >= K see the shorter sequence (layer
K-1 itself finishes on the kept rows only: `prefill_layers`). Each layer's KV cache has the length
of the sequence whose keys that layer computed; decoding appends to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import CapaConfig, keep_count
from ..errors import CapaError
from ..models import adapter_for


@dataclass
class CapaCache:
    """Per-layer keys/values, each with the length its layer saw, and what decoding needs.

    A *segment* is a run of layers that see the same sequence: segment 0 = layers before the first
    pruning layer, segment s = layers from the s-th stage on. Each has its own padding mask."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    segment_masks: list[torch.Tensor]  # [B, S_segment] padding mask of each segment's cached sequence
    layer_segment: list[int]  # segment of each layer
    next_position: torch.Tensor  # [B] next rotary position (positions continue from the *full* prompt)

    def length(self, layer: int) -> int:
        return self.keys[layer].shape[2]


@dataclass
class PrefillState:
    """What the traceable prefill loop returns (the exporter maps these to graph outputs)."""

    hidden: torch.Tensor  # [B, L', D] after the last layer (before the final norm)
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    segment_masks: list[torch.Tensor]
    stage_keep: list[torch.Tensor]  # per stage: [B, k_s] original visual indices kept, ascending
    kept_positions: torch.Tensor  # [B, L'] original sequence indices kept


@dataclass
class PromptRows:
    """What a prefill knows of each row it carries from layer to layer: [B, L'] (positions [..., B, L'])."""

    position_ids: torch.Tensor
    padding_mask: torch.Tensor
    query_weight: torch.Tensor  # 1.0 for the scoring queries
    visual_slots: torch.Tensor  # [B, n] the visual candidates' rows
    kept_positions: torch.Tensor  # original sequence index of each row
    visual_ids: torch.Tensor  # [B, n] original visual index of each candidate

    def keep(self, keep_local: torch.Tensor) -> tuple[torch.Tensor, "PromptRows"]:
        """Keep the candidates keep_local [B, k] (ascending indices into visual_slots) and every
        other row: (keep_seq [B, L' - n + k] the rows kept, the rows after the stage)."""
        keep_seq, visual_slots = drop_visual(self.visual_slots, keep_local, self.padding_mask.shape[1])
        return keep_seq, PromptRows(gather_positions(self.position_ids, keep_seq), self.padding_mask.gather(1, keep_seq),
                                    self.query_weight.gather(1, keep_seq), visual_slots,
                                    self.kept_positions.gather(1, keep_seq), self.visual_ids.gather(1, keep_local))


@dataclass
class CapaOutput:
    logits: torch.Tensor  # [B, L', V] (L' = pruned length) or [B, 1, V] with last_logits_only
    keep_indices: torch.Tensor  # [B, k] original visual-token indices kept, ascending
    past_key_values: CapaCache | None = None
    stage_keep_indices: list[torch.Tensor] = field(default_factory=list)
    kept_positions: torch.Tensor | None = None  # [B, L'] original sequence indices kept


def additive_mask(padding_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, S] additive mask: key j visible to query i iff real and j <= (S - T) + i; a padding
    query row sees itself only. That row's output is never read, but without a visible key its
    softmax would be uniform over every key the kernel is given, so a runtime that computes blocks
    of keys (`blocked_attention`) would write other padding values (and KV cache) than the one-op
    graph and this reference; with one visible key both are the same."""
    batch, keys = padding_mask.shape
    device = padding_mask.device
    query_pos = torch.arange(query_length, device=device)[:, None] + (keys - query_length)
    key_pos = torch.arange(keys, device=device)[None, :]
    causal = key_pos <= query_pos
    real = padding_mask.bool()
    allowed = (causal[None, :, :] & real[:, None, :]) | ((key_pos == query_pos)[None] & ~real[:, -query_length:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class ScoringRows:
    """A scoring layer's attention probabilities, computed for the query rows asked for only.

    The exported graph's fused Attention could output them (qk_matmul_output_mode=3), but then it
    writes all L x L x H probabilities: measured with ONNX Runtime 1.32 at 2,880 visual tokens, that
    layer took 775 ms against 356 ms for a layer without them, when scoring reads the ~46 rows after
    the image. These rows are recomputed here from the layer's q and k (softmax in fp32, as the
    eager path); the layer's output still comes from the fused op."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float):
        self.q, self.k, self.mask, self.scale = q, k, mask, scale

    def rows(self, first) -> torch.Tensor:
        """[B, H, L - first, S] probabilities of query rows first.. (first may be a traced int)."""
        group = self.q.shape[1] // self.k.shape[1]
        k = self.k.repeat_interleave(group, dim=1) if group > 1 else self.k
        scores = (self.q[:, :, first:] @ k.transpose(-1, -2)) * self.scale + self.mask[:, :, first:]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.q.dtype)


def blocked_attention(q, k, v, mask, blocks: int, h: int, h_kv: int, scale: float) -> torch.Tensor:
    """Attention over a whole prompt (no past) as `blocks` ONNX Attention ops, one per block of
    query rows, each given the keys up to its block's last row only. The keys after a block's last
    row are masked (causal) for all of its rows, so each row's softmax and output are the one op's,
    while the work is about (blocks + 1) / (2 blocks) of the full L x L product. Why: ONNX Runtime's
    CPU Attention computes every product the mask then discards (measured with ONNX Runtime 1.32 on
    2 cores, 16 heads of 64, 2,975 rows: 327 ms as one op, 151 ms as 8 blocks, 159 ms for torch's
    causal SDPA). The bounds come from the traced length, so the sequence stays dynamic; with fewer
    rows than blocks some blocks are empty (a build profile refuses more blocks than its shortest
    prompt: runtimes need not take empty Attention inputs)."""
    length = q.shape[2]
    outputs = []
    for block in range(blocks):
        start, end = (block * length) // blocks, ((block + 1) * length) // blocks
        out, _, _, _ = torch.onnx.ops.attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask[:, :, start:end, :end],
            kv_num_heads=h_kv, q_num_heads=h, scale=scale, softmax_precision=1)
        outputs.append(out)
    return torch.cat(outputs, dim=2)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] -> [B, L', D], rows picked by index [B, L']."""
    return x.gather(1, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """positions [..., B, L] (Llama [B, L]; multimodal rotary [3, B, L]) -> [..., B, L']."""
    return positions.gather(-1, index.expand(*positions.shape[:-2], *index.shape))


def complement_slots(slots: torch.Tensor, length) -> torch.Tensor:
    """[B, L - n] ascending indices of 0..L-1 not in `slots` [B, n] (traceable: a sort, no nonzero)."""
    batch = slots.shape[0]
    marked = torch.zeros(batch, length, dtype=torch.long, device=slots.device).scatter(1, slots, 1)
    order_key = torch.arange(length, device=slots.device)[None, :] + marked * length
    return torch.sort(order_key, dim=1).indices[:, : length - slots.shape[1]]


def drop_visual(visual_slots: torch.Tensor, keep_local: torch.Tensor, length):
    """Keep the visual tokens keep_local [B, k] (ascending indices into visual_slots [B, N]) and
    every other token. Returns (keep_seq [B, L - N + k] ascending sequence indices kept,
    new visual_slots [B, k] in the shortened sequence). Traceable: sort and cumsum only."""
    visual_keep = visual_slots.gather(1, keep_local)
    batch = visual_slots.shape[0]
    dropped = torch.zeros(batch, length, dtype=torch.long, device=visual_slots.device)
    dropped = dropped.scatter(1, visual_slots, 1).scatter(1, visual_keep, 0)
    order_key = torch.arange(length, device=visual_slots.device)[None, :] + dropped * length
    keep_seq = torch.sort(order_key, dim=1).indices[:, : length - visual_slots.shape[1] + keep_local.shape[1]]
    # a kept token moves left by the number of tokens dropped before it
    new_slots = visual_keep - torch.cumsum(dropped, dim=1).gather(1, visual_keep)
    return keep_seq, new_slots


def select_with_op(probs, values, o_weight, keep: int, variant: str) -> torch.Tensor:
    """Token selection by the `capa::contrib_topk` op (C++ reference on CPU, the CUDA kernel on GPU),
    whose semantics are `top_k_indices(contribution_scores(...), k)`: int64 [B, k]."""
    from ..ops import contrib_topk

    return contrib_topk(probs.contiguous(), values.contiguous(), o_weight, keep, variant).to(torch.int64)


class CapaModel(nn.Module):
    """A HF LVLM run with CAPA. `forward` prefills (or decodes one step with `past_key_values`)."""

    def __init__(self, model: nn.Module, config: CapaConfig, ffn=None):
        super().__init__()
        self.model = model
        self.adapter = adapter_for(model)
        self.family = self.adapter.family
        self.config = config
        config.check_for_model(self.adapter.num_layers)
        self.ffn = ffn
        self.ffn_layers = self._resolve_ffn_layers(config, ffn)
        self.prune_at = dict(config.prune)  # layer K -> keep k
        #: called as collector(layer, normed_input, ffn_output, is_visual) for layers in
        #: collect_layers when set (calibration)
        self.collector: Callable | None = None
        self.collect_layers: set[int] = set()
        #: called as probe(layer, probs, values, o_weight, visual_slots) with the scoring inputs of
        #: every layer (analysis)
        self.attention_probe: Callable | None = None
        #: exported graphs: attention as fused ONNX Attention ops (set by the exporter); eager runs
        #: always use the explicit softmax, the reference every engine is validated against
        self.fused_attention = False
        #: exported graphs: the prefill layers that attend from every row of the prompt (before the
        #: first stage's scoring layer) split their fused attention into this many blocks of query
        #: rows (`blocked_attention`)
        self.attention_blocks = 1

    def _resolve_ffn_layers(self, config, ffn) -> list[int]:
        if config.ffn_layers == "auto":
            if ffn is None:
                raise CapaError("CapaConfig.ffn_layers is 'auto' but no FFN approximation was given; run "
                                "`capa-export calibrate` (or fit_ffn_approximation) first")
            from .ffn import select_layers

            # the config's threshold and range decide, not whatever the fit was asked for
            layers = select_layers(ffn.layers, config.ffn_threshold, config.resolved_ffn_range(self.adapter.num_layers))
        else:
            layers = list(config.ffn_layers)
        if layers:
            if ffn is None:
                raise CapaError(f"CapaConfig.ffn_layers {layers} needs an FFN approximation; none was given")
            ffn.check_model(self.adapter)
            missing = [x for x in layers if x not in ffn.layers]
            if missing:
                raise CapaError(f"the FFN approximation has no fit for layers {missing}; it covers {sorted(ffn.layers)}")
        return sorted(layers)

    @property
    def device(self):
        return self.adapter.lm_head.weight.device

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: CapaCache | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool = False,
        last_logits_only: bool = False,
        **processor_outputs,
    ) -> CapaOutput:
        """Prefill from the processor's outputs (`capa(**processor(images=..., text=...))`), or
        decode new tokens with `past_key_values`."""
        if past_key_values is not None:
            return self._decode(input_ids, past_key_values, attention_mask, last_logits_only)
        return self._prefill(input_ids, processor_outputs, image_features, attention_mask, position_ids, use_cache,
                             last_logits_only)

    def vision_inputs(self, processor_outputs: dict) -> dict:
        return {k: processor_outputs[k] for k in self.family.vision_keys if processor_outputs.get(k) is not None}

    def embed(self, input_ids, image_features=None, **processor_outputs):
        """Token embeddings with the image features merged in (from the family's vision inputs
        among `processor_outputs`, or given)."""
        embeds = self.adapter.embed_tokens(input_ids)
        vision = self.vision_inputs(processor_outputs)
        if image_features is None and vision:
            image_features = self.family.pack_image_features(self.adapter.image_features(**vision),
                                                             {"input_ids": input_ids, **processor_outputs})
        if image_features is not None:
            embeds = self.family.merge_image_features(input_ids, embeds, image_features)
        elif bool((input_ids == self.family.image_token_id).any()):
            raise CapaError(f"input_ids contain image tokens but no image inputs ({', '.join(self.family.vision_keys)}) "
                            f"were given")
        return embeds

    def visual_slots(self, input_ids: torch.Tensor, processor_outputs: dict | None = None) -> torch.Tensor:
        """[B, N] indices of the pruning candidates (the image tokens, less the family's layout
        tokens unless the config prunes those too); every row must hold the same number."""
        return self.family.visual_positions(input_ids, processor_outputs,
                                            layout_candidates=self.config.prune_layout_tokens)

    def _prefill(self, input_ids, processor_outputs, image_features, attention_mask, position_ids, use_cache,
                 last_logits_only):
        adapter = self.adapter
        self.family.check_inputs({"input_ids": input_ids, **processor_outputs})
        hidden = self.embed(input_ids, image_features=image_features, **processor_outputs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = self.family.prefill_positions(
                {"input_ids": input_ids, "attention_mask": attention_mask, **processor_outputs})
        if bool((attention_mask[:, -1] == 0).any()):
            raise CapaError("attention_mask has padding at the end of a row (right padding); CAPA scores with the "
                            "tokens after the image and decodes after the last token: pad on the left "
                            "(tokenizer.padding_side = 'left')")
        visual_slots = self.visual_slots(input_ids, processor_outputs)
        if self.prune_at:
            if visual_slots.shape[1] == 0:
                raise CapaError("pruning is configured but the input holds no image tokens")
            self.config.check_for_visual_tokens(visual_slots.shape[1])
        query_weight = self.query_weight(visual_slots, attention_mask)
        if self.prune_at and bool((query_weight.sum(1) == 0).any()):
            raise CapaError("the prompt has no text after the image to score visual tokens with; add an "
                            "instruction after the image, or use queries='last'")
        state = self.prefill_layers(hidden, position_ids, attention_mask, visual_slots, query_weight,
                                    select=self.select_tokens, trim_queries=True)
        hidden = state.hidden[:, -1:] if last_logits_only else state.hidden
        logits = adapter.lm_head(adapter.final_norm(hidden))
        batch, num_visual = visual_slots.shape
        keep_indices = (state.stage_keep[-1] if state.stage_keep
                        else torch.arange(num_visual, device=hidden.device).expand(batch, num_visual))
        cache = None
        if use_cache:
            next_position = self.family.next_position(position_ids)
            cache = CapaCache(state.keys, state.values, state.segment_masks, self.layer_segments(), next_position)
        return CapaOutput(logits, keep_indices, cache, state.stage_keep, state.kept_positions)

    def layer_segments(self) -> list[int]:
        stages = sorted(self.prune_at)
        return [sum(1 for k in stages if k <= layer) for layer in range(self.adapter.num_layers)]

    def query_weight(self, visual_slots, padding_mask) -> torch.Tensor:
        """[B, L] 1.0 for the scoring queries (docs/method.md, "Scoring queries"), 0.0 elsewhere. Traceable."""
        batch, length = padding_mask.shape
        positions = torch.arange(length, device=padding_mask.device)[None, :]
        if self.config.queries == "last":
            return (positions == length - 1).to(torch.float32).expand(batch, length)
        if visual_slots.shape[1] == 0:
            return padding_mask.to(torch.float32)
        after_image = positions > visual_slots[:, -1:]
        return (after_image & padding_mask.bool()).to(torch.float32)

    def select_tokens(self, probs, values, o_weight, keep: int) -> torch.Tensor:
        """The eager selection: the capa::contrib_topk op; the exporter passes its own (plugin node or
        standard ops)."""
        return select_with_op(probs, values, o_weight, keep, self.config.variant)

    def prefill_layers(self, hidden, position_ids, padding_mask, visual_slots, query_weight, *, select,
                       trim_queries: bool = False) -> PrefillState:
        """The decoder over the prompt with pruning stages and FFN approximation.

        A stage at layer K drops tokens by scores from layer K-1's attention, and it drops them
        inside layer K-1, as soon as those scores exist: that layer computes keys and values for
        every row (its KV cache holds the whole sequence), but its attention output, o_proj and FFN
        only for the rows layer K receives. Those are row-wise (each row attends over all keys), so
        every kept row's result is what the whole layer would give it, and the rest were never used:
        at 2,928 visual tokens this is most of one full-length layer. (Calibration collects FFN
        activations unpruned; with stages, a collector would see the rows each layer computes.)

        Traceable by torch.export when `select` is (no data-dependent Python), which is how the
        exported prefill graph and this reference share one implementation.
        """
        adapter = self.adapter
        batch, length = hidden.shape[:2]
        num_visual = visual_slots.shape[1]
        rows = PromptRows(position_ids, padding_mask, query_weight, visual_slots,
                          torch.arange(length, device=hidden.device)[None, :].expand(batch, length),
                          torch.arange(num_visual, device=hidden.device)[None, :].expand(batch, num_visual))
        keys_out, values_out, segment_masks, stage_keep = [], [], [], []
        cos, sin = adapter.rotary(hidden, rows.position_ids)
        mask = additive_mask(rows.padding_mask, length, hidden.dtype)
        for index in range(adapter.num_layers):
            stage = self.prune_at.get(index + 1)
            parts = adapter.layer(index)
            normed = parts.input_norm(hidden)
            q, k, v = self._project(parts, normed, cos, sin)
            if stage is not None or self.attention_probe is not None:
                probs = ScoringRows(q, k, mask, parts.attention_scale)
                scoring = self._scoring_inputs(index, probs, v, rows.visual_slots, rows.query_weight, trim_queries)
                if self.attention_probe is not None:
                    self.attention_probe(index, *scoring, rows.visual_slots)
            if stage is not None:
                segment_masks.append(rows.padding_mask)  # this layer's cache: the whole sequence
                # a keep fraction is of the original N (in an exported graph: k computed from N)
                keep_seq, rows = rows.keep(select(*scoring, keep_count(stage, num_visual)))
                stage_keep.append(rows.visual_ids)
                # the kept rows' queries over every key: their mask rows, no blocks (few rows)
                q = q.gather(2, keep_seq[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
                attn_out, _ = self._attend(parts, q, k, v, mask.gather(2, keep_seq[:, None, :, None].expand(
                    -1, mask.shape[1], -1, mask.shape[3])), None)
                hidden = self._ffn_block(index, gather_rows(hidden, keep_seq) + attn_out, rows.visual_slots)
                cos, sin = adapter.rotary(hidden, rows.position_ids)
                mask = additive_mask(rows.padding_mask, hidden.shape[1], hidden.dtype)
            else:
                whole_prompt = not any(s <= index for s in self.prune_at)
                attn_out, _ = self._attend(parts, q, k, v, mask, None, self.attention_blocks if whole_prompt else 1)
                hidden = self._ffn_block(index, hidden + attn_out, rows.visual_slots)
            keys_out.append(k)
            values_out.append(v)
        segment_masks.append(rows.padding_mask)
        return PrefillState(hidden, keys_out, values_out, segment_masks, stage_keep, rows.kept_positions)

    def _scoring_inputs(self, index, probs, values, visual_slots, query_weight, trim_queries: bool):
        """What the scoring layer computed, cut to the visual keys: probs [B, H, Q, N]
        (rows of non-scoring queries zeroed: they add exactly 0 to every variant), values
        [B, H_kv, N, d], W_O. The leading rows no batch element scores with are cut first (padding
        is on the left, so every scoring row is at or after the first one): without the cut the
        exported graph gathered and scored all L rows, ~13x the ~46 that count at LLaVA sizes.
        `trim_queries` (eager) reads the cut as a Python int; traced, it is a data-dependent
        slice start (`.item()` with its bounds checked for torch.export)."""
        length = query_weight.shape[1]
        if trim_queries:
            rows = query_weight.nonzero()[:, 1]
            first = int(rows.min()) if rows.numel() else length - 1
        else:
            first = (query_weight.sum(0) > 0).to(torch.int64).argmax().item()
            torch._check(first >= 0)
            torch._check(first < length)
        probs = probs.rows(first)
        b, h = probs.shape[:2]
        n = visual_slots.shape[1]
        probs_q = probs.gather(3, visual_slots[:, None, None, :].expand(b, h, probs.shape[2], n))
        probs_q = probs_q * query_weight[:, None, first:, None].to(probs_q.dtype)
        values_v = values.gather(2, visual_slots[:, None, :, None].expand(b, values.shape[1], n, values.shape[3]))
        return probs_q, values_v, self.adapter.layer(index).o_proj.weight

    # ------------------------------------------------------------------------------------------
    def _layer(self, index, hidden, cos, sin, mask, past, visual_slots):
        """One decoder layer on every row of `hidden` (decoding: `past` holds the layer's cache)."""
        parts = self.adapter.layer(index)
        q, k, v = self._project(parts, parts.input_norm(hidden), cos, sin)
        attn_out, (keys, values) = self._attend(parts, q, k, v, mask, past)
        return self._ffn_block(index, hidden + attn_out, visual_slots), (keys, values)

    def _ffn_block(self, index, hidden, visual_slots):
        """The layer's second half on `hidden` (after attention and its residual): norm, FFN (the
        affine map on visual rows where approximated), residual."""
        adapter = self.adapter
        parts = adapter.layer(index)
        residual = hidden
        normed = parts.post_attention_norm(hidden)
        has_visual = visual_slots is not None and visual_slots.shape[1] > 0
        if index in self.ffn_layers and has_visual:
            # Visual rows take the affine map of the un-gained normalised input, text rows the full
            # FFN: gathered apart so the FFN really runs on text rows only, then scattered back.
            text_slots = complement_slots(visual_slots, hidden.shape[1])
            text_out = parts.mlp(gather_rows(normed, text_slots))
            visual_in = adapter.rms_normalize(parts.post_attention_norm, gather_rows(hidden, visual_slots))
            visual_out = self.ffn.apply(index, visual_in).to(text_out.dtype)
            width = hidden.shape[-1]
            ffn_out = torch.zeros_like(hidden)
            ffn_out = ffn_out.scatter(1, text_slots[..., None].expand(*text_slots.shape, width), text_out)
            ffn_out = ffn_out.scatter(1, visual_slots[..., None].expand(*visual_slots.shape, width), visual_out)
        else:
            ffn_out = parts.mlp(normed)
        if self.collector is not None and has_visual and index in self.collect_layers:
            full = ffn_out if index not in self.ffn_layers else parts.mlp(normed)
            is_visual = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            self.collector(index, normed, full, is_visual.scatter(1, visual_slots, True))
        return residual + ffn_out

    def _project(self, parts, x, cos, sin):
        """q [B, H, L, d], k and v [B, H_kv, L, d] of the normalised rows x, rotary applied."""
        batch, length, _ = x.shape
        h, h_kv, d = parts.num_heads, parts.num_kv_heads, parts.head_dim
        q = parts.q_proj(x).view(batch, length, h, d).transpose(1, 2)
        k = parts.k_proj(x).view(batch, length, h_kv, d).transpose(1, 2)
        v = parts.v_proj(x).view(batch, length, h_kv, d).transpose(1, 2)
        q, k = self.adapter.apply_rotary(q, k, cos, sin)
        return q, k, v

    def _attend(self, parts, q, k, v, mask, past, blocks: int = 1):
        """Attention of the query rows q over the keys (past + k), through o_proj: ([B, T, D], the
        layer's keys and values with the past ones). mask [B, 1, T, S]: rows of q, columns of keys."""
        batch, length = q.shape[0], q.shape[2]
        h, h_kv, d = parts.num_heads, parts.num_kv_heads, parts.head_dim
        if self.fused_attention and torch.onnx.is_in_onnx_export():
            # ONNX Attention (opset 23): fused ops for runtimes to run with their own kernel
            # (TensorRT >= 10.14, ONNX Runtime >= 1.23); it appends the new keys to the past ones.
            # The scoring layer's probabilities are not taken from it (qk_matmul_output_mode=3 writes
            # all L x L x H of them; scoring reads the rows after the image): see ScoringRows.
            if past is None and blocks > 1:
                out = blocked_attention(q, k, v, mask, blocks, h, h_kv, parts.attention_scale)
            else:
                out, k, v, _ = torch.onnx.ops.attention(
                    q, k, v, attn_mask=mask, past_key=None if past is None else past[0],
                    past_value=None if past is None else past[1], kv_num_heads=h_kv, q_num_heads=h,
                    scale=parts.attention_scale, softmax_precision=1)  # 1 = FLOAT: softmax in fp32, as eager
            return parts.o_proj(out.transpose(1, 2).reshape(batch, length, h * d)), (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        group = h // h_kv
        k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k
        v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v
        scores = (q @ k_rep.transpose(-1, -2)) * parts.attention_scale + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v_rep).transpose(1, 2).reshape(batch, length, h * d)
        return parts.o_proj(out), (k, v)

    # ------------------------------------------------------------------------------------------
    def _decode(self, input_ids, cache: CapaCache, attention_mask, last_logits_only):
        hidden = self.adapter.embed_tokens(input_ids)
        batch, steps = input_ids.shape
        new_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if new_mask.shape != input_ids.shape:
            raise CapaError(f"when decoding with past_key_values, attention_mask covers the new tokens only: "
                            f"expected shape {tuple(input_ids.shape)}, got {tuple(new_mask.shape)}")
        positions = self.family.decode_positions(cache.next_position, steps)
        masks = [torch.cat([m, new_mask.to(m.dtype)], dim=1) for m in cache.segment_masks]
        hidden, keys, values = self.decode_layers(hidden, positions, masks, cache.keys, cache.values,
                                                  cache.layer_segment)
        cache.keys, cache.values, cache.segment_masks = keys, values, masks
        cache.next_position = cache.next_position + steps
        if last_logits_only:
            hidden = hidden[:, -1:]
        logits = self.adapter.lm_head(self.adapter.final_norm(hidden))
        return CapaOutput(logits, torch.empty(0, dtype=torch.long), cache)

    def decode_layers(self, hidden, positions, segment_masks, past_keys, past_values, layer_segment):
        """New tokens through every layer, each attending to its own cache (traceable).
        segment_masks[s]: [B, S_s + T] padding mask of segment s including the new tokens."""
        steps = hidden.shape[1]
        cos, sin = self.adapter.rotary(hidden, positions)
        additive = [additive_mask(m, steps, hidden.dtype) for m in segment_masks]
        keys_out, values_out = [], []
        for index in range(self.adapter.num_layers):
            past = (past_keys[index], past_values[index])
            hidden, (keys, values) = self._layer(index, hidden, cos, sin, additive[layer_segment[index]], past, None)
            keys_out.append(keys)
            values_out.append(values)
        return hidden, keys_out, values_out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16, eos_token_id: int | None = None,
                 image_features=None, **processor_outputs) -> tuple[torch.Tensor, CapaOutput]:
        """Greedy decoding with the CAPA cache. Returns (new tokens [B, T], the prefill output)."""
        if max_new_tokens < 1:
            raise CapaError(f"max_new_tokens={max_new_tokens} must be >= 1")
        prefill = self(input_ids, attention_mask=attention_mask, use_cache=True,
                       last_logits_only=True, image_features=image_features, **processor_outputs)
        cache = prefill.past_key_values
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None:
                finished |= token[:, 0] == eos_token_id
                if bool(finished.all()):
                    break
            out = self(token, past_key_values=cache, last_logits_only=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1), prefill


def apply_capa(model: nn.Module, config: CapaConfig | None = None, ffn=None) -> CapaModel:
    """Wrap a HF LVLM (from `load_model`) so that it runs with CAPA."""
    return CapaModel(model, config or CapaConfig(), ffn).eval()
