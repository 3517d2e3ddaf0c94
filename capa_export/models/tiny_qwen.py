"""`tiny-qwen2-vl` and `tiny-qwen2.5-vl`: Qwen-VL models built in code, offline, in seconds.

They keep the real token geometry (patch 14, spatial merge 2, temporal patch 2, so 1176 values per
flattened patch and 28 x 28 pixels per visual token; Qwen2.5-VL's 112-pixel attention windows; the
vocabulary of 151,936 and the Qwen2 tokenizer's special-token ids; M-RoPE with the real 2:3:3
`mrope_section` split, scaled to the head size; q/k/v biases; tied embeddings as the 2B / 3B
checkpoints have them) with small widths and depth and deterministic weights from a seed.

The tokenizer is transformers' own `Qwen2Tokenizer` (its pre-tokenizer, special tokens and the
Qwen-VL chat template) over a byte-level vocabulary: the 256 byte tokens first, then pseudo-words
so decoded random-weight output is readable, then the special tokens at their real ids. The image
processor is the Qwen2-VL PIL processor with min_pixels = 256 and max_pixels = 512 visual tokens'
worth of pixels, so any image gives 256-512 visual tokens (the real processor allows 4-1280;
the raised minimum keeps a fixed keep count such as 64 or 192 valid for every image).

As in `tiny-llava-random`, the visual tokens share a large common offset (the merger's output bias along
one direction), around which the SwiGLU FFN is near-linear: what CAPA's FFN approximation relies
on, here by construction, not a claim about any trained checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .qwen2_vl import (ENDOFTEXT_ID, IMAGE_PAD_ID, IM_END_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID,
                       Qwen2_5VLFamily, Qwen2VLFamily, image_only_processor_class)
from .registry import embedded_model

VOCAB_SIZE = 151936
#: ids 151643.. of the Qwen2 tokenizer's special tokens; Qwen2.5's adds the tool-call and FIM ones
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
SPECIAL_TOKENS_2_5 = SPECIAL_TOKENS + ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                       "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
#: the Qwen2-VL / Qwen2.5-VL instruct checkpoints' chat template
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PIXELS_PER_TOKEN = 28 * 28
MIN_PIXELS = 256 * PIXELS_PER_TOKEN
MAX_PIXELS = 512 * PIXELS_PER_TOKEN


@dataclass(frozen=True)
class TinyQwenSpec:
    """Widths of the tiny models; the token geometry is Qwen-VL's and is not configurable."""

    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 352
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 128
    seed: int = 0

    @property
    def mrope_section(self) -> list[int]:
        """The real [16, 24, 24] split of 64 rotary pairs (2:3:3), for this head size."""
        pairs = self.text_hidden // self.text_heads // 2
        temporal = pairs // 4
        return [temporal, (pairs - temporal) // 2, pairs - temporal - (pairs - temporal) // 2]


def _text_config(spec: TinyQwenSpec) -> dict:
    return dict(vocab_size=VOCAB_SIZE, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.text_kv_heads, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": spec.mrope_section},
                bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, tie_word_embeddings=True)


def _token_ids() -> dict:
    return dict(image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
                vision_end_token_id=VISION_END_ID, tie_word_embeddings=True)


def tiny_qwen2_vl_config(spec: TinyQwenSpec = TinyQwenSpec()):
    from transformers import Qwen2VLConfig

    vision = dict(depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
                  hidden_act="quick_gelu", mlp_ratio=spec.vision_intermediate // spec.vision_hidden,
                  num_heads=spec.vision_heads, in_channels=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_text_config(spec), vision_config=vision, **_token_ids())
    config.name_or_path = "tiny-qwen2-vl"
    return config


def tiny_qwen2_5_vl_config(spec: TinyQwenSpec = TinyQwenSpec()):
    from transformers import Qwen2_5_VLConfig

    # the real checkpoints' full-attention blocks are every 8th of 32 ([7, 15, 23, 31]): here every 2nd
    vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden, out_hidden_size=spec.text_hidden,
                  intermediate_size=spec.vision_intermediate, hidden_act="silu", num_heads=spec.vision_heads,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                  window_size=112, fullatt_block_indexes=list(range(1, spec.vision_layers, 2)))
    config = Qwen2_5_VLConfig(text_config=_text_config(spec), vision_config=vision, **_token_ids())
    config.name_or_path = "tiny-qwen2.5-vl"
    return config


def _pseudo_words():
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    yield from syllables
    for a in syllables:
        for b in syllables:
            yield a + b
    for a in syllables:
        for b in syllables:
            for c in syllables:
                yield a + b + c


def qwen_byte_level_tokenizer(special_tokens=SPECIAL_TOKENS):
    """transformers' Qwen2Tokenizer over a byte-level vocabulary with the real special-token ids.

    No merges, so every text encodes byte by byte (nothing to download); ids 256..151642 are
    decode-only pseudo-words (readable output from random weights)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())  # GPT-2's order, which Qwen2's vocabulary starts with
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    space = bytes_to_unicode()[ord(" ")]
    for word, token_id in zip(_pseudo_words(), range(len(vocab), ENDOFTEXT_ID)):
        vocab[space + word] = token_id
    for offset, token in enumerate(special_tokens):
        vocab[token] = ENDOFTEXT_ID + offset
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, padding_side="left", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in special_tokens[1:]]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen_processor(family=Qwen2VLFamily, special_tokens=SPECIAL_TOKENS):
    """The family's HF processor (images only where torchvision, which HF's video processor needs,
    is missing) with the Qwen2-VL PIL image processor and a small pixel range."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tokenizer = qwen_byte_level_tokenizer(special_tokens)
    processor_class = family._hf_processor_class()
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                               chat_template=CHAT_TEMPLATE)
    return image_only_processor_class(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                       chat_template=CHAT_TEMPLATE)


def _build(model_class, config, spec: TinyQwenSpec, dtype: torch.dtype):
    from .base import cast_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_class(config)
        _plant_visual_offset(model, spec.seed)
    model = cast_model(model, dtype).eval()
    model.config.name_or_path = config.name_or_path
    return model


@embedded_model("tiny-qwen2-vl", family="qwen2_vl")
def build_tiny_qwen2_vl(spec: TinyQwenSpec = TinyQwenSpec(vision_layers=2), dtype: torch.dtype = torch.float32):
    """(model, processor) with deterministic weights; no file is read or downloaded."""
    from transformers import Qwen2VLForConditionalGeneration

    model = _build(Qwen2VLForConditionalGeneration, tiny_qwen2_vl_config(spec), spec, dtype)
    return model, tiny_qwen_processor(Qwen2VLFamily, SPECIAL_TOKENS)


@embedded_model("tiny-qwen2.5-vl", family="qwen2_5_vl")
def build_tiny_qwen2_5_vl(spec: TinyQwenSpec = TinyQwenSpec(), dtype: torch.dtype = torch.float32):
    """(model, processor) with deterministic weights; no file is read or downloaded."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = _build(Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config(spec), spec, dtype)
    return model, tiny_qwen_processor(Qwen2_5VLFamily, SPECIAL_TOKENS_2_5)


def _plant_visual_offset(model, seed: int) -> None:
    """Visual tokens share a large common offset (the merger's output bias along one direction), as
    projected image features cluster away from text embeddings in trained models; around it the
    SwiGLU FFN is close to its linearisation. Queries and keys are scaled up so attention is not
    near-uniform. Deterministic from the seed."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(4.0)
        last = model.model.visual.merger.mlp[-1]
        hidden = last.weight.shape[0]
        offset = torch.randn(hidden, generator=gen)
        last.bias += 2.5 * offset / offset.norm() * (hidden**0.5) * 0.08
