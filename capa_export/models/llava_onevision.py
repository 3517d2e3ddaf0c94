"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, the llava-onevision-qwen2 checkpoints):
LLaVA-NeXT's anyres packing with a SigLIP tower and a Qwen2 decoder.

What sets this family apart from LLaVA-NeXT (llava_next.py, whose geometry, checks and host-side
packing it shares):

- **SigLIP crops.** 384 x 384 crops, patch 14: 729 features per crop, all kept (no CLS token;
  `vision_feature_select_strategy="full"`, `vision_feature_layer=-1`). The pinpoints are 1 x 1 to
  6 x 6 crops of 384 (36 of them), so an image is cut into 2 to 37 crops.
- **anyres_max_9.** After unpadding, a grid larger than 9 crops' worth of patches (by more than
  10% in area) is downsampled bilinearly to about 9 crops' worth; the newline ends each row of the
  grid as it is after that, and the base crop has none. An image gives at most about 8,700 tokens.
- **Multi-image prompts.** When a prompt holds several images (`batch_num_images`), each is one
  padded-to-square crop: 729 tokens and one newline at its end.

Packing is HF's own `LlavaOnevisionModel.pack_image_features` and the token count is the OneVision
processor's own `_get_unpadded_features` (which applies the same max-9 cap), each bound to the config
values it reads, so engines pack, and the layout mask finds the newlines, exactly as HF does.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..errors import CapaError
from .llava_next import LlavaNextAdapter, LlavaNextFamily, _hf_packer
from .registry import register_family

CROP_SIZE = 384
#: the llava-onevision-qwen2 checkpoints' pinpoints, (height, width): their "(1x1),...,(6x6)" grid
#: spec expanded as LLaVA-OneVision does (the transformers config's and image processor's default)
DEFAULT_PINPOINTS = [[CROP_SIZE * rows, CROP_SIZE * cols] for rows in range(1, 7) for cols in range(1, 7)]
#: the llava-hf OneVision checkpoints' chat layout: a user turn's images first, then its text
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    def describe_vision(self) -> dict:
        cfg = self.model.config
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        if cfg.vision_feature_select_strategy != "full" or getattr(cfg.vision_config, "model_type", "") != \
                "siglip_vision_model":
            # HF's packing needs side x side features per crop: a SigLIP tower (no CLS) with "full"
            raise CapaError(f"this LLaVA-OneVision model has a {cfg.vision_config.model_type} tower with "
                            f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; capa-export "
                            f"serves the checkpoints' SigLIP tower with 'full' ({side * side} features per crop)")
        return {**super().describe_vision(), "vision_aspect_ratio": str(cfg.vision_aspect_ratio)}


def image_only_processor_class():
    """`LlavaOnevisionProcessor` without its video processor (transformers' video processors need
    torchvision): HF's own processing of images and text, saved under the base class's name."""
    from transformers import LlavaOnevisionProcessor

    global _IMAGE_ONLY
    if _IMAGE_ONLY is not None:
        return _IMAGE_ONLY

    # the base's parameters less video_processor, spelled out: ProcessorMixin reads the sub-processors
    # from this signature, and saves and loads the options it names
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        LlavaOnevisionProcessor.__init__(self, image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                                         vision_feature_select_strategy=vision_feature_select_strategy,
                                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise CapaError("video inputs are not supported yet; give images")
        return LlavaOnevisionProcessor.__call__(self, images=images, text=text, **kwargs)

    def to_dict(self):
        data = LlavaOnevisionProcessor.to_dict(self)
        data["processor_class"] = LlavaOnevisionProcessor.__name__
        return data

    _IMAGE_ONLY = type("ImageOnlyLlavaOnevisionProcessor", (LlavaOnevisionProcessor,),
                       {"__init__": __init__, "__call__": __call__, "to_dict": to_dict, "__module__": __name__})
    return _IMAGE_ONLY


_IMAGE_ONLY = None


@register_family
class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    adapter = LlavaOnevisionAdapter
    title = "LLaVA-OneVision"
    # image_sizes and batch_num_images: for the host-side packing (a prompt of several images has
    # one crop per image)
    text_keys = ("input_ids", "attention_mask", "image_sizes", "batch_num_images")
    bench_sizes = {}  # none yet (LLaVA-NeXT's sizes are its own)

    @property
    def max_patches(self) -> int:
        """The N of anyres_max_N: grids above about N crops' worth of patches are downsampled."""
        aspect = str(self.info.get("vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_"):].isdigit():
            raise CapaError(f"vision_aspect_ratio {aspect!r} is not one LLaVA-OneVision packs ('anyres_max_N')")
        return int(aspect[len("anyres_max_"):])

    # --- geometry ------------------------------------------------------------------------------------
    def grid(self, image_size) -> tuple[int, int]:
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        return get_anyres_image_grid_shape([int(x) for x in image_size], self.pinpoints, int(self.info["image_size"]))

    def _unpadded_features(self, height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
        """(grid tokens, newlines): the OneVision processor's own count, max-N cap included."""
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        side = int(self.info["image_size"]) // int(self.info["patch_size"])
        host = SimpleNamespace(vision_aspect_ratio=f"anyres_max_{self.max_patches}")
        return LlavaOnevisionProcessor._get_unpadded_features(host, height, width, side, side, rows, cols)

    def unpadded_grid(self, image_size) -> tuple[int, int]:
        """(rows, columns) of grid tokens after unpadding and the max-N downsampling."""
        rows, cols = self.grid(image_size)
        height, width = (int(x) for x in image_size)
        tokens, newlines = self._unpadded_features(height, width, rows, cols)
        return newlines, (tokens // newlines if newlines else 0)

    def _single_image_prompts(self, batch: dict) -> list[bool]:
        """Per image: whether its prompt holds it alone (anyres crops) or with others (one crop)."""
        images = int(torch.as_tensor(batch["image_sizes"]).shape[0])
        counts = batch.get("batch_num_images")
        if counts is None:
            return [True] * images  # as HF: without batch_num_images every image is anyres
        counts = [int(n) for n in torch.as_tensor(counts).reshape(-1).tolist()]
        if sum(counts) != images or min(counts, default=1) < 1:
            raise CapaError(f"batch_num_images {counts} does not add up to the {images} image(s) of image_sizes; "
                            f"pass the processor's outputs of one call")
        return [n == 1 for n in counts for _ in range(n)]

    def image_crops(self, batch: dict) -> list[int]:
        sizes = torch.as_tensor(batch["image_sizes"]).tolist()
        return [self.crops(size) if alone else 1 for size, alone in zip(sizes, self._single_image_prompts(batch))]

    def image_layouts(self, batch: dict) -> list[tuple[int, int]]:
        """(rows, columns) after the base crop; an image of a multi-image prompt is (1, 0): its one
        crop, then a newline."""
        sizes = torch.as_tensor(batch["image_sizes"]).tolist()
        return [self.unpadded_grid(size) if alone else (1, 0)
                for size, alone in zip(sizes, self._single_image_prompts(batch))]

    def visual_token_range(self, processor=None) -> tuple[int, int]:
        """(fewest, most) pruning candidates of one image: the base crop's 729 always (an image of
        extreme aspect ratio unpads to almost no grid rows; a multi-image prompt's image is its base
        crop), up to the largest grid (with its newlines) any aspect ratio unpads a pinpoint's grid to,
        after the max-N cap: the processor's own count over every unpadded shape."""
        return self.crop_tokens, self.crop_tokens + _most_grid_tokens(self)

    def dim_ranges(self, processor, shapes: dict) -> dict[str, tuple[int, int, int]]:
        """LLaVA-NeXT's, after checking that the processor packs as the model does (its max-N cap and
        features per crop decide how many image tokens it writes)."""
        theirs = getattr(processor, "vision_aspect_ratio", None)
        ours = f"anyres_max_{self.max_patches}"
        if theirs is not None and theirs != ours:
            raise CapaError(f"the processor's vision_aspect_ratio {theirs!r} differs from the model's {ours!r}; "
                            f"save the processor that belongs to the model")
        per_crop = getattr(processor, "num_image_tokens", None)
        if per_crop is not None and int(per_crop) != self.crop_tokens:
            raise CapaError(f"the processor's num_image_tokens {per_crop} differs from the model's {self.crop_tokens} "
                            f"features per crop; save the processor that belongs to the model")
        return super().dim_ranges(processor, shapes)

    # --- between the graphs --------------------------------------------------------------------------
    def _hf_pack(self, pieces, sizes, newline):
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        packed, _ = _hf_packer(self.info, LlavaOnevisionModel)(pieces, sizes, image_newline=newline,
                                                               vision_aspect_ratio=f"anyres_max_{self.max_patches}")
        return packed

    # --- inputs ----------------------------------------------------------------------------------------
    def prompt(self, processor, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def load_processor(cls, path: str, **kwargs):
        """transformers' OneVision processor requires a video processor, which needs torchvision;
        without it, the same processor class with images only (videos refused)."""
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            return super().load_processor(path, **kwargs)
        return image_only_processor_class().from_pretrained(path, **kwargs)


def _most_grid_tokens(family: LlavaOnevisionFamily) -> int:
    """The most grid tokens (with newlines) of one image: every shape unpadding can leave of each
    pinpoint's grid (full height and any width, or full width and any height: what an image of that
    aspect ratio gives), counted by the processor's own function."""
    size, side = int(family.info["image_size"]), int(family.info["image_size"]) // int(family.info["patch_size"])
    key = (tuple(map(tuple, family.pinpoints)), size, side, family.max_patches)
    if key not in _MOST:
        most = 0
        for height, width in family.pinpoints:
            rows, cols = height // size, width // size
            # an "image" of (rows * side, w) patches unpads the grid to width w (or w + 1: padding is cut
            # in pairs), as any image of that aspect ratio does
            shapes = [(rows * side, w) for w in range(1, cols * side + 1)] + \
                     [(h, cols * side) for h in range(1, rows * side + 1)]
            for h, w in shapes:
                tokens, newlines = family._unpadded_features(h, w, rows, cols)
                most = max(most, tokens + newlines)
        _MOST[key] = most
    return _MOST[key]


_MOST: dict[tuple, int] = {}
