"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, 2-layer projector, and a
Llama-style decoder (Vicuna; Mistral or Qwen2 text backbones work the same way: the rotary helper
is taken from the decoder's own modeling module, not hard-wired to Llama)."""

from __future__ import annotations


import torch

from .base import HFDecoderAdapter, ModelFamily
from .registry import register_family


class LlavaAdapter(HFDecoderAdapter):

    def describe_vision(self) -> dict:
        return {"image_size": int(self.model.config.vision_config.image_size),
                "visual_tokens_per_image": int(self.model.config.image_seq_length)}

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
