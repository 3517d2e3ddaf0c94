"""The four exported graphs, as nn.Modules over a CapaModel (the reference itself: the prefill
and decode graphs run `CapaModel.prefill_layers` / `decode_layers`, so graph and reference share
one implementation and differ only in how the tokens are selected). Their inputs and outputs are
the model family's graph contract (`capa_export/contract.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..method.capa_model import CapaModel
from ..ops.onnx_function import node_attributes
from ..ops.spec import SPEC

#: How the prefill graph holds the token selection (docs: README "Pruning lowerings"):
#:   function  one CapaContribTopK node + its ONNX local function (ONNX Runtime runs the body,
#:             TensorRT with the plugin loaded runs the plugin, TensorRT without it the body)
#:   inline    the function's body inlined: standard ops only, for runtimes without local functions
PRUNING_LOWERINGS = ("function", "inline")
#: the names earlier versions used (plugin node / standard ops), still accepted
LOWERING_ALIASES = {"plugin": "function", "onnx": "inline"}


def pruning_lowering(name: str) -> str:
    from ..errors import CapaError

    name = LOWERING_ALIASES.get(name, name)
    if name not in PRUNING_LOWERINGS:
        raise CapaError(f"pruning lowering {name!r} is unknown; expected one of {', '.join(PRUNING_LOWERINGS)}")
    return name


def select_with_function(variant: str):
    """Eager: the capa::contrib_topk op. Exported: one CapaContribTopK node, inputs in the graph's
    dtype (the function body accumulates in fp32; no fp32 copy of W_O) and k as an int64 [1]
    tensor (computed from N for a keep fraction), int32 [B, k] output."""

    def select(probs, values, o_weight, keep) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            dtype = values.dtype
            static = isinstance(keep, int) and not isinstance(keep, torch.SymInt)
            k = torch.full((1,), keep, dtype=torch.int64, device=probs.device)
            indices = torch.onnx.ops.symbolic(
                f"{SPEC.onnx_domain}::{SPEC.name}",
                (probs.to(dtype), values, o_weight.to(dtype), k),
                attrs=node_attributes(keep if static else 0, variant),
                dtype=torch.int32,
                shape=(probs.shape[0], keep),
                version=1,
            )
        else:
            from ..ops import contrib_topk

            indices = contrib_topk(probs, values, o_weight, keep, variant)
        return indices.to(torch.int64)

    return select


class VisionGraph(nn.Module):
    def __init__(self, capa: CapaModel):
        super().__init__()
        self.capa = capa

    def forward(self, vision_inputs: list[torch.Tensor]):  # the family's vision inputs, in its order
        return self.capa.adapter.image_features(**dict(zip(self.capa.family.vision_keys, vision_inputs)))


class EmbedGraph(nn.Module):
    def __init__(self, capa: CapaModel):
        super().__init__()
        self.capa = capa

    def forward(self, input_ids):
        return self.capa.adapter.embed_tokens(input_ids)


class PrefillGraph(nn.Module):
    def __init__(self, capa: CapaModel, pruning: str):
        super().__init__()
        self.capa = capa
        variant = capa.config.variant
        # exported graphs hold the function node ("inline" is the same node, inlined after export);
        # "reference" selects as the eager CapaModel does (validation's reference runner)
        self.select = capa.select_tokens if pruning == "reference" else select_with_function(variant)

    def forward(self, inputs_embeds, attention_mask, position_ids, visual_positions):
        capa = self.capa
        query_weight = capa.query_weight(visual_positions, attention_mask)
        state = capa.prefill_layers(inputs_embeds, position_ids, attention_mask, visual_positions, query_weight,
                                    select=self.select)
        # [B, 1, D] rather than [B, D]: the same MatMul (and folded weight layout) as decode, so the
        # lm_head bytes are shared in weights.data instead of stored once per layout
        logits = capa.adapter.lm_head(capa.adapter.final_norm(state.hidden[:, -1:]))[:, 0]
        # unpruned: every candidate kept (0..N-1; candidates need not be contiguous)
        keep = state.stage_keep[-1] if state.stage_keep else \
            torch.cumsum(torch.ones_like(visual_positions), dim=1) - 1
        outputs = [logits, keep]
        outputs += state.segment_masks
        for key, value in zip(state.keys, state.values):
            outputs += [key, value]
        return tuple(outputs)


class DecodeGraph(nn.Module):
    def __init__(self, capa: CapaModel):
        super().__init__()
        self.capa = capa
        self.layer_segment = capa.layer_segments()

    def forward(self, inputs_embeds, position_ids, past_masks: list[torch.Tensor], past: list[torch.Tensor]):
        capa = self.capa
        keys, values = past[0::2], past[1::2]
        # the new tokens are real tokens: each segment's mask grows by ones
        new = torch.ones(inputs_embeds.shape[:2], dtype=past_masks[0].dtype, device=inputs_embeds.device)
        segment_masks = [torch.cat([mask, new], dim=1) for mask in past_masks]
        hidden, new_keys, new_values = capa.decode_layers(inputs_embeds, position_ids, segment_masks, keys, values,
                                                          self.layer_segment)
        logits = capa.adapter.lm_head(capa.adapter.final_norm(hidden))
        outputs = [logits]
        for key, value in zip(new_keys, new_values):
            outputs += [key, value]
        return tuple(outputs)


def graph_modules(capa: CapaModel, pruning: str) -> dict[str, nn.Module]:
    """The four graph modules; pruning "reference" selects tokens as the eager CapaModel does."""
    return {"vision": VisionGraph(capa), "embed": EmbedGraph(capa), "prefill": PrefillGraph(capa, pruning),
            "decode": DecodeGraph(capa)}


@torch.no_grad()
def graph_inputs(capa: CapaModel, batch: dict, decode_tokens: torch.Tensor | None = None) -> dict[str, dict]:
    """Every graph's inputs, keyed by the contract's names, for one processor batch: the vision
    inputs, the prompt's ids, the prefill's merged embeddings and positions, and a decode step of
    `decode_tokens` [B, T] (default: the greedy next token) on the reference prefill's cache."""
    family = capa.family
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefill = capa(**batch, use_cache=True, last_logits_only=True)
    cache = prefill.past_key_values
    if decode_tokens is None:
        decode_tokens = prefill.logits[:, -1].argmax(-1, keepdim=True)
    decode = {"inputs_embeds": capa.adapter.embed_tokens(decode_tokens),
              "position_ids": family.decode_positions(cache.next_position, decode_tokens.shape[1])}
    decode.update({f"past_segment_mask.{s}": m.to(torch.int64) for s, m in enumerate(cache.segment_masks)})
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        decode[f"past.{i}.key"], decode[f"past.{i}.value"] = k, v
    return {
        "vision": capa.vision_inputs(batch),
        "embed": {"input_ids": ids},
        "prefill": {"inputs_embeds": capa.embed(**batch), "attention_mask": mask.to(torch.int64),
                    "position_ids": family.prefill_positions(batch), "visual_positions": capa.visual_slots(ids, batch)},
        "decode": decode,
    }
