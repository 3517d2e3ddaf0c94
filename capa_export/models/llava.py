"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, 2-layer projector, and a
Llama-style decoder (Vicuna; Mistral or Qwen2 text backbones work the same way: the rotary helper
is taken from the decoder's own modeling module, not hard-wired to Llama)."""

from __future__ import annotations

import sys

import torch

from .base import HFDecoderAdapter, LayerParts, ModelFamily
from .registry import register_family


class LlavaAdapter(HFDecoderAdapter):
    def __init__(self, model):
        self._decoder = model.model.language_model
        self._text_config = model.config.text_config
        attention = self._decoder.layers[0].self_attn
        self._rotary_module = sys.modules[type(attention).__module__]
        super().__init__(model)

    def describe_vision(self) -> dict:
        return {"image_size": int(self.model.config.vision_config.image_size),
                "visual_tokens_per_image": int(self.model.config.image_seq_length)}

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

    @property
    def text_model(self):
        return self._decoder

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



def bench_config_parts(spec: dict) -> dict:
    """The LLaVA config fields of a benchmark size: a CLIP/336 tower (patch 14, layer -2 without
    CLS) and a Llama decoder of the spec's widths (shared by LLaVA-1.5 and LLaVA-NeXT)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    return dict(
        vision_config=CLIPVisionConfig(hidden_size=spec["vision_hidden"], intermediate_size=spec["vision_intermediate"],
                                       num_hidden_layers=spec["vision_layers"], num_attention_heads=spec["vision_heads"],
                                       image_size=336, patch_size=14),
        text_config=LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                                num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                                num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"]),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")


@register_family
class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    adapter = LlavaAdapter
    #: random-weight models of real sizes for `capa-export bench` (decoder dims; the vision tower is
    #: CLIP-L/336). "visual" is the number of visual tokens fed (LLaVA-NeXT sizes: llava_next.py).
    bench_sizes = {
        # LLaVA-1.5 token geometry with a small decoder: what a CPU can time in seconds
        "mid": dict(hidden=1024, layers=16, heads=16, kv_heads=16, intermediate=2816, vocab=32064,
                    vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, visual=576),
        "llava-1.5-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32064,
                             vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, visual=576),
    }

    def prompt(self, processor, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"USER: <image>\n{question} ASSISTANT:"

    @classmethod
    def bench_model(cls, size: str, device: str):
        """(random-weight fp32 model, visual tokens to feed) of a benchmark size."""
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        spec = cls.bench_sizes[size]
        config = LlavaConfig(**bench_config_parts(spec))
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
        return model, spec["visual"]
