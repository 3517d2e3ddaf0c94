"""The model-family interface: everything the CAPA model, the exporter, validation and the runtime
need to know about a model family, and nothing more. Only `capa_export/models/` knows where a family
keeps its parts; everything else asks a family or an adapter.

- `ModelFamily`: what a family is without its weights (like Optimum's export configs): its graphs'
  input/output contract, the processor outputs it needs, its chat prompt, how rotary positions are
  made, how image features are merged into the token embeddings. Made from a small JSON-able
  description (`info`), so the runtime can use it from an engine manifest alone.
- `ModelAdapter`: one loaded HF model: where its decoder layers, norms, projections, rotary
  embedding, vision tower and head are.

A new family is one file in this package defining both (registered with `@register_family`) plus its
tiny builder (registered with `@embedded_model`); see `llava.py`.

Positions are tensors whose last two dimensions are [batch, sequence], with family-specific leading
rows (Llama: [B, L]; multimodal rotary such as Qwen2-VL's: [3, B, L]), so the same gathers apply.
"""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..contract import FLOAT, FLOAT32, GraphContract, TensorSpec, decoder_contract
from ..errors import CapaError


@dataclass
class LayerParts:
    """One decoder layer, as the CAPA layer loop sees it."""

    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_attention_norm: nn.Module
    mlp: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_scale: float


class ModelFamily(abc.ABC):
    """A model family without weights. `info` is what `ModelAdapter.describe()` wrote (and what an
    engine manifest records under "model")."""

    name: ClassVar[str] = ""
    #: HF `config.model_type` values this family serves.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: processor outputs the vision graph takes, in its input order
    vision_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: every processor output the pipeline keeps (others are dropped)
    text_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    #: leading rows of the rotary position ids (() for [B, L]; (3,) for multimodal rotary)
    position_rows: ClassVar[tuple[int, ...]] = ()
    #: the adapter class (set by @register_family from `adapter`)
    adapter: ClassVar[type["ModelAdapter"]]
    #: benchmark sizes: name -> what `bench_model` needs to build a random-weight model of that size
    bench_sizes: ClassVar[dict[str, dict]] = {}

    def __init__(self, info: dict):
        self.info = info

    @property
    def processor_keys(self) -> tuple[str, ...]:
        return (*self.text_keys, *self.vision_keys)

    @property
    def image_token_id(self) -> int:
        return int(self.info["image_token_id"])

    # --- the graphs -----------------------------------------------------------------------------
    def vision_graph_io(self) -> tuple[tuple[TensorSpec, ...], TensorSpec]:
        """(inputs, output) of the vision graph; the default is LLaVA's fixed-size images."""
        from ..contract import IMAGES

        size = int(self.info["image_size"])
        pixels = TensorSpec("pixel_values", FLOAT32, (IMAGES, 3, size, size))  # cast to the model's type inside
        features = TensorSpec("image_features", FLOAT, (IMAGES, int(self.info["visual_tokens_per_image"]),
                                                         int(self.info["hidden_size"])))
        return (pixels,), features

    def graph_contract(self, layer_segment: list[int], keep: int | None = None) -> GraphContract:
        inputs, features = self.vision_graph_io()
        return decoder_contract(layer_segment=layer_segment, hidden=int(self.info["hidden_size"]),
                                vocab=int(self.info["vocab_size"]), kv_heads=int(self.info["num_kv_heads"]),
                                head_dim=int(self.info["head_dim"]), vision_inputs=inputs, image_features=features,
                                position_rows=self.position_rows, keep=keep)

    def visual_token_range(self, processor=None) -> tuple[int, int]:
        """(fewest, most) visual tokens one image gives (with this processor, for families whose
        processor decides the image size)."""
        n = int(self.info["visual_tokens_per_image"])
        return n, n

    def dim_ranges(self, processor, shapes: dict) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of the graph dimensions a build profile does not name but the family
        derives (visual tokens per image; for dynamic resolution also the patches, from the
        profile's `pixels` range and the processor's limits). The engine manifest records them."""
        low, high = self.visual_token_range(processor)
        return {"visual_tokens": (low, high, high)}

    # --- inputs -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def prompt(self, processor, question: str) -> str:
        """The family's chat prompt for one image and one question."""

    def encode(self, processor, images, questions, return_tensors: str = "pt") -> dict:
        """Processor outputs the pipeline needs for images + questions (one image per prompt;
        several prompts are left-padded)."""
        prompts = [self.prompt(processor, q) for q in questions]
        batch = processor(images=list(images), text=prompts, return_tensors=return_tensors,
                          padding=len(prompts) > 1)
        return {k: batch[k] for k in self.processor_keys if k in batch}

    def check_inputs(self, batch: dict) -> None:
        """Refuse, in one line, processor outputs the family cannot serve (e.g. videos)."""

    def check_image_sizes(self, batch: dict, dims: dict) -> None:
        """Refuse images outside an engine's ranges (`dims`: the manifest's `vision_dims`); fixed-size
        images (the default) always fit."""

    def image_count(self, batch: dict) -> int:
        """How many images the batch holds: runs of image tokens, over all rows."""
        is_image = torch.as_tensor(batch["input_ids"]) == self.image_token_id
        starts = is_image[:, 1:] & ~is_image[:, :-1]
        return int(is_image[:, 0].sum() + starts.sum())

    @classmethod
    def load_processor(cls, path: str, **kwargs):
        """The processor saved in `path` (a checkpoint or an engine's processor/ folder)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)

    # --- what happens between the graphs (torch, used by the CapaModel and the engine runtime) ----
    def layout_token_mask(self, batch: dict) -> torch.Tensor | None:
        """[B, L] True at image tokens that carry layout rather than content (LLaVA-NeXT's row
        newlines), from the processor outputs; None when the family has none."""
        return None

    def visual_positions(self, input_ids: torch.Tensor, batch: dict | None = None,
                         layout_candidates: bool = False) -> torch.Tensor:
        """[B, N] sequence indices of the pruning candidates: the image tokens, less the layout
        tokens (`layout_token_mask`) unless `layout_candidates`; those stay in the sequence like text.
        `batch`: the processor outputs (families with layout tokens need them). Every row must hold
        the same number."""
        is_visual = input_ids == self.image_token_id
        if not layout_candidates:
            layout = self.layout_token_mask({**(batch or {}), "input_ids": input_ids})
            if layout is not None:
                is_visual = is_visual & ~layout.to(is_visual.device)
        counts = is_visual.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise CapaError(f"every batch row must hold the same number of image tokens; got {counts.tolist()}")
        return is_visual.nonzero()[:, 1].view(input_ids.shape[0], int(counts[0]))

    def bench_image_size(self) -> list[int] | None:
        """(height, width) the benchmark's pictures are resized to, so that one gives the most visual
        tokens the family's images can (`capa-export bench`); None: the processor's own size."""
        return None

    def pack_image_features(self, image_features: torch.Tensor, batch: dict) -> torch.Tensor:
        """The vision output -> the features of the image-token slots, in order (from the processor
        outputs `batch`); the identity unless the family arranges features on the host (LLaVA-NeXT's
        unpadding and row newlines)."""
        return image_features

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """Write image features into the image-token slots, in order (LLaVA's masked_scatter)."""
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        n_features = image_features.numel() // inputs_embeds.shape[-1]
        if n_slots != n_features:
            images = image_features.shape[0] if image_features.dim() == 3 else 0
            per_image = image_features.shape[1] if images else 0
            if images and n_slots and n_slots % images == 0 and n_slots // images != per_image:
                # each placeholder was expanded, to another count than the vision tower gives
                raise CapaError(
                    f"the processor expands each image to {n_slots // images} image tokens but the model's vision "
                    f"tower gives {per_image} per image: the processor does not belong to this model (its "
                    f"image_seq_length or image size differs); save the model's own processor with it")
            raise CapaError(
                f"input_ids has {n_slots} image-token slots but the images give {n_features} features; "
                f"the prompt needs one image placeholder per image (the processor expands it)"
            )
        # input_ids may stay on the host while the embeddings are on the GPU (the engine runtime):
        # masked_scatter's CUDA kernel refuses a mask on another device
        mask = slots.to(inputs_embeds.device).unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(
            mask, image_features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype).reshape(-1))

    def prefill_positions(self, batch: dict) -> torch.Tensor:
        """Rotary positions of the prompt, as the HF model's forward makes them when given none:
        0..L-1 for every row (left padding shifts a row's positions uniformly, which rotary
        attention does not see)."""
        input_ids = batch["input_ids"]
        rows, length = input_ids.shape
        return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(rows, length)

    def next_position(self, positions: torch.Tensor) -> torch.Tensor:
        """[B] the first decode position: one past the largest prompt position of each row."""
        batch, length = positions.shape[-2:]
        return positions.reshape(-1, batch, length).amax(dim=(0, 2)) + 1

    def decode_positions(self, next_position: torch.Tensor, steps: int) -> torch.Tensor:
        """Positions of `steps` new text tokens from next_position [B]: [*rows, B, steps]."""
        positions = next_position[:, None] + torch.arange(steps, device=next_position.device)[None, :]
        return positions.expand(*self.position_rows, *positions.shape) if self.position_rows else positions


class ModelAdapter(abc.ABC):
    """Wraps one loaded Hugging Face LVLM; `family` is its ModelFamily."""

    family_class: ClassVar[type[ModelFamily]]

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = self.family_class(self.describe())

    @property
    def family_name(self) -> str:
        return self.family_class.name

    def describe(self) -> dict:
        """What the family needs to know of this model without its weights (JSON-able)."""
        first = self.layer(0)
        return {"family": self.family_class.name, "model_type": self.model.config.model_type,
                "image_token_id": self.image_token_id, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": first.num_heads,
                "num_kv_heads": first.num_kv_heads, "head_dim": first.head_dim, **self.describe_vision()}

    @abc.abstractmethod
    def describe_vision(self) -> dict:
        """The family's vision geometry (e.g. image_size, visual_tokens_per_image)."""

    # --- geometry -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def image_token_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def layer(self, index: int) -> LayerParts: ...

    @property
    @abc.abstractmethod
    def text_model(self) -> nn.Module:
        """The HF decoder module (layers, rotary embedding, final norm): for references and benchmarks."""

    # --- embeddings and vision ------------------------------------------------------------
    @abc.abstractmethod
    def image_features(self, **vision_inputs) -> torch.Tensor:
        """The family's vision inputs -> image features in the decoder's space (traced into the
        vision graph): [images, tokens_per_image, hidden] or [tokens, hidden]."""

    @abc.abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    # --- decoder pieces -------------------------------------------------------------------
    @abc.abstractmethod
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for these positions, as the family's decoder layers expect them."""

    @abc.abstractmethod
    def apply_rotary(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    @abc.abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    @abc.abstractmethod
    def lm_head(self) -> nn.Module: ...

    @abc.abstractmethod
    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The elementwise gain gamma of an RMS norm (folded into the FFN approximation)."""

    @abc.abstractmethod
    def rms_normalize(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The norm without its gain: norm(x) == rms_normalize(norm, x) * norm_gain(norm)."""

    # --- the family's model-free parts, for callers holding an adapter ----------------------
    def prompt_with_image(self, processor, question: str) -> str:
        return self.family.prompt(processor, question)

    def num_visual_tokens_per_image(self) -> int:
        return self.family.visual_token_range()[1]

    # --- identity -------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What identifies this model's weights, to refuse artifacts made from another model.

        A sample of weight values (16 per layer's o_proj) rather than a hash, so the same checkpoint
        loaded in fp32, fp16 or bf16 matches (compare with `fingerprints_match`), while two
        different checkpoints, or two seeds of the tiny model, do not.
        """
        sample = [self.layer(i).o_proj.weight.detach().flatten()[:16].float().cpu() for i in range(self.num_layers)]
        return {
            "family": self.family,
            "model_type": self.model.config.model_type,
            "name_or_path": str(getattr(self.model.config, "name_or_path", "")),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "weight_sample": [round(float(x), 6) for x in torch.cat(sample)],
        }


class HFDecoderAdapter(ModelAdapter):
    """An adapter whose decoder is a transformers Llama-style decoder (Llama, Qwen2: embed_tokens,
    rotary_emb, RMS norms with a `weight` gain normalised in fp32, the attention module's
    `apply_rotary_pos_emb`; q/k/v biases, where the model has them, applied by its nn.Linear) at
    `model.model.language_model`, its config at `model.config.text_config`."""

    def __init__(self, model: nn.Module):
        self._decoder = model.model.language_model
        self._text_config = model.config.text_config
        self._rotary_module = sys.modules[type(self._decoder.layers[0].self_attn).__module__]
        super().__init__(model)

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

    # --- decoder pieces -------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._decoder.embed_tokens(input_ids)

    def rotary(self, hidden, position_ids):
        # the decoder's own rotary module (Qwen-VL's: M-RoPE, [3, B, L] positions, mrope_section rows)
        return self._decoder.rotary_emb(hidden, position_ids)

    def apply_rotary(self, q, k, cos, sin):
        return self._rotary_module.apply_rotary_pos_emb(q, k, cos, sin)

    @property
    def final_norm(self):
        return self._decoder.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    def norm_gain(self, norm):
        return norm.weight

    def rms_normalize(self, norm, x):
        # LlamaRMSNorm / Qwen2RMSNorm: normalise in fp32, cast back, then (outside) the gain
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return x32.to(x.dtype)


#: Buffers that must stay fp32 whatever the model dtype: rotary frequencies rounded to fp16 turn
#: into angle errors of ~0.25 rad at position 600 (inv_freq * position).
FP32_BUFFERS = ("inv_freq", "original_inv_freq")


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), keeping the rotary frequency buffers in fp32."""
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()
             if name.rsplit(".", 1)[-1] in FP32_BUFFERS}
    model.to(dtype)
    for name, value in saved.items():
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        setattr(module, attribute, value.to(getattr(module, attribute).device))
    return model


def fingerprints_match(saved: dict, current: dict) -> str | None:
    """None when `saved` describes the same model as `current`; else what differs, in words."""
    for key in ("model_type", "num_layers", "hidden_size"):
        if saved.get(key) != current.get(key):
            return f"{key} is {saved.get(key)!r} in the artifact but {current.get(key)!r} in the model"
    a = torch.tensor(saved.get("weight_sample", []))
    b = torch.tensor(current["weight_sample"])
    # Half precision rounds to ~3 significant digits; different weights differ far more.
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-3):
        return "its weights differ (the weight sample of the o_proj layers does not match)"
    return None
