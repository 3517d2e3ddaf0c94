"""The four exported graphs, as nn.Modules over a CapaModel (the reference itself: the prefill
and decode graphs run `CapaModel.prefill_layers` / `decode_layers`, so graph and reference share
one implementation and differ only in how the tokens are selected).

    vision.onnx   pixel_values [I, 3, H, W]            -> image_features [I, T, D]
    embed.onnx    input_ids [B, L]                     -> inputs_embeds [B, L, D]
    prefill.onnx  inputs_embeds [B, L, D], attention_mask [B, L], position_ids [B, L],
                  visual_positions [B, N]              -> logits [B, V] (last position), keep_indices [B, k],
                                                          segment_mask.{s} [B, S_s], present.{i}.key/value
    decode.onnx   inputs_embeds [B, T, D], position_ids [B, T], segment_mask.{s} [B, S_s + T],
                  past.{i}.key/value [B, H_kv, S_seg(i), d] -> logits [B, T, V], present.{i}.key/value
"""

from __future__ import annotations

import torch
from torch import nn

from ..capa.model import CapaModel
from ..capa.scoring import contribution_scores_dense
from ..ops.native import variant_code

PLUGIN_OP = "CapaContribTopK"
PLUGIN_DOMAIN = "ai.onnx.contrib"  # TensorRT's parser ignores the domain; onnxruntime-extensions needs this one
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "capa"
PRUNING_LOWERINGS = ("plugin", "onnx")  # and "reference": the eager selection, for validation runners


def select_with_standard_ops(variant: str):
    """Scores in MatMul/ReduceSum/Sqrt, then TopK and a sort of the kept indices (standard ONNX)."""

    def select(probs, values, o_weight, keep: int) -> torch.Tensor:
        scores = contribution_scores_dense(probs, values, o_weight, variant)
        return torch.sort(torch.topk(scores, keep, dim=-1).indices, dim=-1).values

    return select


def select_with_plugin(variant: str):
    """One CapaContribTopK node (the TensorRT plugin; onnxruntime-extensions runs it on CPU).

    Its inputs are cast to fp32 whatever the graph's dtype: the plugin accumulates in fp32 anyway,
    the probabilities come from an fp32 softmax, and one input type keeps every runtime able to run
    it (onnxruntime-extensions' Python ops have no fp16/bf16)."""

    def select(probs, values, o_weight, keep: int) -> torch.Tensor:
        args = (probs.float(), values.float(), o_weight.float())
        if torch.onnx.is_in_onnx_export():
            indices = torch.onnx.ops.symbolic(
                f"{PLUGIN_DOMAIN}::{PLUGIN_OP}",
                args,
                attrs={"k": int(keep), "variant": variant_code(variant), "plugin_version": PLUGIN_VERSION,
                       "plugin_namespace": PLUGIN_NAMESPACE},
                dtype=torch.int32,
                shape=(probs.shape[0], keep),
                version=1,
            )
        else:
            from ..ops import contrib_topk

            indices = contrib_topk(*args, keep, variant)
        return indices.to(torch.int64)

    return select


class VisionGraph(nn.Module):
    def __init__(self, capa: CapaModel):
        super().__init__()
        self.capa = capa

    def forward(self, pixel_values):
        return self.capa.adapter.image_features(pixel_values)


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
        selectors = {"plugin": select_with_plugin, "onnx": select_with_standard_ops}
        self.select = selectors[pruning](variant) if pruning in selectors else capa.select_tokens

    def forward(self, inputs_embeds, attention_mask, position_ids, visual_positions):
        capa = self.capa
        query_weight = capa.query_weight(visual_positions, attention_mask)
        state = capa.prefill_layers(inputs_embeds, position_ids, attention_mask, visual_positions, query_weight,
                                    select=self.select)
        # [B, 1, D] rather than [B, D]: the same MatMul (and folded weight layout) as decode, so the
        # lm_head bytes are shared in weights.data instead of stored once per layout
        logits = capa.adapter.lm_head(capa.adapter.final_norm(state.hidden[:, -1:]))[:, 0]
        keep = state.stage_keep[-1] if state.stage_keep else visual_positions - visual_positions[:, :1]
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
