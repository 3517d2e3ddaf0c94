"""`tiny-llava-onevision`: the embedded LLaVA-OneVision model, built in code, offline, in seconds.

It keeps llava-onevision-qwen2's real token geometry (SigLIP 384 px crops, patch 14 -> 729 tokens
per crop, all kept; the 36 pinpoints from 1 x 1 to 6 x 6 crops; unpadding, anyres_max_9
downsampling and a learned newline per grid row: up to about 8,700 image tokens per image; a Qwen2
decoder with the Qwen2 vocabulary of 151,936, `<image>` 151646 and `<video>` 151647 after the
tokenizer's `<|endoftext|>` / `<|im_start|>` / `<|im_end|>`, q/k/v biases, tied embeddings as the
0.5B checkpoint has them, rope theta 1e6; 2-layer GELU projector; the checkpoints' chat layout)
with `tiny-llava-random`'s small widths and depth and deterministic weights from a seed.

The tokenizer is tiny-qwen's byte-level Qwen2 tokenizer (tiny_qwen.py) with OneVision's special
tokens; the image processor is OneVision's PIL processor with SigLIP's normalisation (0.5, 0.5).
Visual structure is planted as in `tiny-llava-random` (tiny.py): a common visual offset and attention
sinks, a stand-in for trained structure, not a claim about any checkpoint.
"""

from __future__ import annotations

import torch

from .llava_onevision import CHAT_TEMPLATE, CROP_SIZE, DEFAULT_PINPOINTS, image_only_processor_class
from .registry import embedded_model
from .tiny import TinyLlavaSpec, _plant_visual_structure
from .tiny_qwen import ENDOFTEXT_ID, IM_END_ID, VOCAB_SIZE, qwen_byte_level_tokenizer

TINY_NAME = "tiny-llava-onevision"
PATCH_SIZE = 14
IMAGE_TOKEN_ID = 151646
VIDEO_TOKEN_ID = 151647
#: ids 151643.. of the llava-onevision-qwen2 tokenizer's special tokens
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def tiny_llava_onevision_config(spec: TinyLlavaSpec = TinyLlavaSpec()):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                image_size=CROP_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    text = Qwen2Config(hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, vocab_size=VOCAB_SIZE, hidden_act="silu",
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID,
                       tie_word_embeddings=True)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS],
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    config.name_or_path = TINY_NAME
    return config


def tiny_llava_onevision_processor():
    """OneVision's processor (images only where torchvision, which HF's video processor needs, is missing)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.utils import is_torchvision_available

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": CROP_SIZE, "width": CROP_SIZE},
        image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS],
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )
    tokenizer = qwen_byte_level_tokenizer(SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    options = dict(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                   num_image_tokens=(CROP_SIZE // PATCH_SIZE) ** 2, vision_feature_select_strategy="full",
                   vision_aspect_ratio="anyres_max_9")
    if is_torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionProcessor(video_processor=LlavaOnevisionVideoProcessor(), **options)
    return image_only_processor_class()(**options)


@embedded_model(TINY_NAME, family="llava_onevision")
def build_tiny_llava_onevision(spec: TinyLlavaSpec = TinyLlavaSpec(), dtype: torch.dtype = torch.float32):
    """(model, processor) with deterministic weights; no file is read or downloaded."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from .base import cast_model

    config = tiny_llava_onevision_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaOnevisionForConditionalGeneration(config)
        _plant_visual_structure(model, spec.seed)
    model = cast_model(model, dtype).eval()
    model.config.name_or_path = TINY_NAME
    return model, tiny_llava_onevision_processor()
