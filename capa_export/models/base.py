"""The model-adapter interface: everything the CAPA model, the analysis and the exporter need to
know about a model family, and nothing more. Only `capa_export/models/` knows where a family keeps
its parts; everything else asks an adapter.

Positions are handled as tensors whose last dimension is the sequence (so Qwen2-VL's [3, B, L]
multimodal rotary positions fit the same gathers as Llama's [B, L]).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn


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


class ModelAdapter(abc.ABC):
    """Wraps one Hugging Face LVLM instance. Subclasses register themselves in `registry.py`."""

    family: str = ""
    #: HF `config.model_type` values this adapter serves.
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

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

    # --- embeddings and vision ------------------------------------------------------------
    @abc.abstractmethod
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values -> [num_images, tokens_per_image, hidden] in the decoder's space."""

    @abc.abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write image features into the image-token slots, in order (LLaVA's masked_scatter)."""
        slots = input_ids == self.image_token_id
        n_slots, n_features = int(slots.sum()), image_features.shape[0] * image_features.shape[1]
        if n_slots != n_features:
            from ..errors import CapaError

            raise CapaError(
                f"input_ids has {n_slots} image-token slots but the images give {n_features} features; "
                f"the prompt needs one image placeholder per image (the processor expands it)"
            )
        mask = slots.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype).reshape(-1))

    # --- decoder pieces -------------------------------------------------------------------
    @abc.abstractmethod
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for these positions, as the family's decoder layers expect them."""

    @abc.abstractmethod
    def apply_rotary(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abc.abstractmethod
    def default_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

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

    # --- inputs ---------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def prompt_with_image(cls, processor, question: str) -> str:
        """The family's chat prompt for one image and one question."""

    def num_visual_tokens_per_image(self) -> int:
        return int(self.model.config.image_seq_length)

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
