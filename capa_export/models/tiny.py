"""`tiny-llava-random`: a tiny LLaVA-1.5 built in code with random weights, offline, in seconds.

The embedded default, `tiny-llava`, is the same architecture trained on Shapes-VQA
(`tiny_trained.py`); this random-weight builder stays for tests that need planted structure and
any width or depth (`TinyLlavaSpec`).

It has LLaVA-1.5's real token geometry (336 px images, patch 14 -> 576 visual tokens, vocabulary
32064, image token 32000, CLIP feature layer -2 without CLS, 2-layer GELU projector, Vicuna chat
template) with small widths and depth, grouped-query attention, and deterministic random weights
from a seed. Its tokenizer is byte-level (every prompt encodes without a vocabulary file) and its
image processor is CLIP's PIL processor with the CLIP normalisation constants.

Random weights make attention near-uniform; to give the analysis and the pruning something to
find, a few vision patches are given large, structured activations by scaling rows of the
projector output bias per input (see `_plant_visual_structure`): a deterministic stand-in for the
sinks trained models have, not a claim about any trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import embedded_model

TINY_NAME = "tiny-llava-random"
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB_SIZE = 32064
IMAGE_SIZE = 336
PATCH_SIZE = 14
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Widths of the tiny model; the token geometry is LLaVA-1.5's and is not configurable."""

    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 352
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    seed: int = 0


def tiny_llava_config(spec: TinyLlavaSpec = TinyLlavaSpec()):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    config.name_or_path = TINY_NAME
    return config


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer over LLaVA's id layout: 0 <unk>, 1 <s>, 2 </s>, bytes 3..258,
    pseudo-words up to 31999 (so decoded random-weight output is readable), 32000 <image>, 32001 <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(sorted(byte_chars, key=lambda c: list(bytes_to_unicode().values()).index(c))):
        vocab[ch] = 3 + i
    # Pseudo-words from syllables: decode-only entries (no merges), so encoding stays byte-level.
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    space = bytes_to_unicode()[ord(" ")]
    words = syllables + [a + b for a in syllables for b in syllables]
    words += [a + b + c for a in syllables[:8] for b in syllables for c in syllables]
    for word, token_id in zip(words, range(len(vocab), IMAGE_TOKEN_ID)):
        vocab[space + word] = token_id
    vocab["<image>"] = IMAGE_TOKEN_ID
    vocab["<pad>"] = PAD_TOKEN_ID

    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llava_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_byte_level_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


@embedded_model(TINY_NAME, family="llava")
def build_tiny_llava(spec: TinyLlavaSpec = TinyLlavaSpec(), dtype: torch.dtype = torch.float32):
    """(model, processor) with deterministic weights; no file is read or downloaded."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
        _plant_visual_structure(model, spec.seed)
    from .base import cast_model

    model = cast_model(model, dtype).eval()
    model.config.name_or_path = TINY_NAME
    return model, tiny_llava_processor()


def _plant_visual_structure(model, seed: int) -> None:
    """Give the random model two properties trained LVLMs have and random init lacks.

    - Visual tokens share a large common offset (the projector's output bias along one direction),
      as projected image features in trained LLaVA cluster away from text embeddings. Around that
      offset the SwiGLU FFN is close to its linearisation, so visual rows are near-linear while text
      rows are not: the mechanism CAPA's FFN approximation relies on, here by construction.
    - Attention sinks: a few image patches (those with strong activations in projector input
      channels 4..7) get a large component along a "sink" direction s; every layer's keys respond to
      s and every query to a direction t that all text embeddings share (on the lowest-frequency
      rotary pair, so the match survives rotary embedding), and the values ignore s. So those
      patches draw outsized attention, and the more s dominates a token the smaller its value: the
      dump / anchor split that the analysis looks for.
    Deterministic from the seed; a stand-in for trained structure, not a claim about any checkpoint.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(4.0)
        fc2 = model.model.multi_modal_projector.linear_2
        hidden = fc2.weight.shape[0]
        offset = torch.randn(hidden, generator=gen)
        fc2.bias += 2.5 * offset / offset.norm() * (hidden**0.5) * 0.08
        _plant_sinks(model, gen)


def _plant_sinks(model, gen: torch.Generator, key_gain: float = 2.0, text_shift: float = 0.5,
                 patch_gain: float = 2.0) -> None:
    lm = model.model.language_model
    cfg = lm.config
    hidden, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // heads
    sink = torch.randn(hidden, generator=gen)
    sink /= sink.norm()
    text = torch.randn(hidden, generator=gen)
    text -= (text @ sink) * sink
    text /= text.norm()
    lm.embed_tokens.weight += text_shift * text
    fc2 = model.model.multi_modal_projector.linear_2
    fc2.weight[:, 4:8] += patch_gain * sink[:, None] * torch.randn(1, 4, generator=gen)
    # rotate_half pairs dims i and i + head_dim/2; the last of each half turns slowest with position
    key_dir = torch.zeros(kv_heads, head_dim)
    key_dir[:, head_dim // 2 - 1] = key_dir[:, head_dim - 1] = 2**-0.5
    query_dir = key_dir.repeat_interleave(heads // kv_heads, dim=0)
    for layer in lm.layers:
        attention = layer.self_attn
        attention.k_proj.weight += key_gain * torch.outer(key_dir.flatten(), sink)
        attention.q_proj.weight += key_gain * torch.outer(query_dir.flatten(), text)
        attention.v_proj.weight -= torch.outer(attention.v_proj.weight @ sink, sink)
