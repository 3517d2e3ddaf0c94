"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, 2-layer projector, and a
Llama-style decoder (Vicuna; Mistral or Qwen2 text backbones work the same way: the rotary helper
is taken from the decoder's own modeling module, not hard-wired to Llama)."""

from __future__ import annotations

import sys

import torch

from .base import LayerParts, ModelAdapter


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)

    def __init__(self, model):
        super().__init__(model)
        self._decoder = model.model.language_model
        self._text_config = model.config.text_config
        attention = self._decoder.layers[0].self_attn
        self._rotary_module = sys.modules[type(attention).__module__]

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_layers(self) -> int:
        return len(self._decoder.layers)

    @property
    def hidden_size(self) -> int:
        return int(self._text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self._text_config.vocab_size)

    def layer(self, index: int) -> LayerParts:
        layer = self._decoder.layers[index]
        attention = layer.self_attn
        cfg = self._text_config
        num_heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads)
        return LayerParts(
            input_norm=layer.input_layernorm,
            q_proj=attention.q_proj,
            k_proj=attention.k_proj,
            v_proj=attention.v_proj,
            o_proj=attention.o_proj,
            post_attention_norm=layer.post_attention_layernorm,
            mlp=layer.mlp,
            num_heads=num_heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
            head_dim=head_dim,
            attention_scale=float(getattr(attention, "scaling", head_dim**-0.5)),
        )

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # What LlavaModel.get_image_features computes, without its split into a per-image list (which
        # would fix the number of images when the vision graph is exported).
        cfg = self.model.config
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values.to(self.model.dtype), output_hidden_states=True).hidden_states
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
        selected = [hidden[layer] for layer in layers]
        if cfg.vision_feature_select_strategy == "default":
            selected = [h[:, 1:] for h in selected]  # drop CLS
        return self.model.model.multi_modal_projector(torch.cat(selected, dim=-1))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._decoder.embed_tokens(input_ids)

    def rotary(self, hidden, position_ids):
        return self._decoder.rotary_emb(hidden, position_ids)

    def apply_rotary(self, q, k, cos, sin):
        return self._rotary_module.apply_rotary_pos_emb(q, k, cos, sin)

    def default_position_ids(self, input_ids, attention_mask):
        # As the HF decoder's forward does when given no position_ids: 0..L-1 for every row.
        batch, length = input_ids.shape
        return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)

    @property
    def final_norm(self):
        return self._decoder.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    def norm_gain(self, norm):
        return norm.weight

    def rms_normalize(self, norm, x):
        # LlamaRMSNorm: normalise in fp32, cast back, then the gain.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return x32.to(x.dtype)

    @classmethod
    def prompt_with_image(cls, processor, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"USER: <image>\n{question} ASSISTANT:"
