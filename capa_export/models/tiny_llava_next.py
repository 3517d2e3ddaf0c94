"""`tiny-llava-next`: the embedded LLaVA-NeXT model, built in code, offline, in seconds.

It keeps llava-v1.6-vicuna's real token geometry (336 px crops, patch 14 -> 576 tokens per crop,
the five default `image_grid_pinpoints`, unpadding and a learned newline per grid row: up to 2,928
image tokens per image; vocabulary 32064, image token 32000, CLIP feature layer -2 without CLS,
2-layer GELU projector, the Vicuna chat template) with `tiny-llava-random`'s small widths and depth and
deterministic weights from a seed. Tokenizer and planted visual structure are `tiny-llava-random`'s (see
tiny.py); the image processor is LLaVA-NeXT's PIL processor with the CLIP normalisation.
"""

from __future__ import annotations

import torch

from .registry import embedded_model
from .tiny import (CHAT_TEMPLATE, IMAGE_SIZE, IMAGE_TOKEN_ID, PATCH_SIZE, TinyLlavaSpec, _byte_level_tokenizer,
                   _plant_visual_structure, tiny_llava_config)
from .llava_next import DEFAULT_PINPOINTS

TINY_NAME = "tiny-llava-next"


def tiny_llava_next_config(spec: TinyLlavaSpec = TinyLlavaSpec()):
    from transformers import LlavaNextConfig

    base = tiny_llava_config(spec)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS],
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    config.name_or_path = TINY_NAME
    return config


def tiny_llava_next_processor():
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS],
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=_byte_level_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


@embedded_model(TINY_NAME, family="llava_next")
def build_tiny_llava_next(spec: TinyLlavaSpec = TinyLlavaSpec(), dtype: torch.dtype = torch.float32):
    """(model, processor) with deterministic weights; no file is read or downloaded."""
    from transformers import LlavaNextForConditionalGeneration

    from .base import cast_model

    config = tiny_llava_next_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaNextForConditionalGeneration(config)
        _plant_visual_structure(model, spec.seed)
    model = cast_model(model, dtype).eval()
    model.config.name_or_path = TINY_NAME
    return model, tiny_llava_next_processor()
