"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

What sets this family apart from LLaVA-1.5:

- **Dynamic resolution.** The processor resizes an image so that its area lies in
  [min_pixels, max_pixels] with sides multiples of 28 (patch 14 x merge 2), cuts it into 14 x 14
  patches in 2 x 2 blocks, repeats it over a temporal patch of 2 frames and flattens each patch to
  C*T*p*p = 1176 values: `pixel_values` [P, 1176] and `image_grid_thw` [images, 3] (1, h, w in
  patches). The vision tower (Conv3d patch embedding, 2-D rotary, Qwen2.5's window attention with a
  few full-attention blocks) ends in a 2 x 2 merger: N = P / 4 visual tokens, which the prompt holds
  as N `<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`.
- **M-RoPE.** Rotary positions have three rows (temporal, height, width) [3, B, L], computed by the
  HF model's own `get_rope_index` from `input_ids`, `mm_token_type_ids` and `image_grid_thw`; the
  head dimension's rotary pairs are split between the rows by `mrope_section`. An image's tokens
  take positions on its grid, so the largest prompt position is below L - 1 and decoding continues
  from it (HF's rope deltas): step t of a row is at (its largest prompt position) + 1 + t on all
  three rows. Pruning gathers all three rows of the kept tokens, never renumbers them.

The vision graph: `image_features(pixel_values, image_grid_thw)` is traced by torch.export with P
and the number of images dynamic. HF's own vision forward cannot be traced that way (it splits
the sequence per image and per attention window with `tolist()` on grid values), so the adapter
runs the same HF modules (patch embedding, rotary embedding, each block's norms, qkv, projection
and MLP, the merger) with the per-image and per-window split expressed as an attention mask
computed from `image_grid_thw` by tensor arithmetic. Attention within a window does not depend on
the order of its tokens, and the merger takes each 2 x 2 block whole, so HF's reordering of the
patches by window (and back) is not needed. The cost: attention is computed densely over all P
patches and masked, O(P^2) per block, where HF's flash path computes O(P * window) for windowed
blocks.
"""

from __future__ import annotations

import math
import sys
from types import MethodType, SimpleNamespace

import torch

from ..contract import FLOAT, FLOAT32, IMAGES, INT64, PATCHES, Dim, TensorSpec
from ..errors import CapaError
from .base import HFDecoderAdapter, ModelFamily
from .registry import register_family

#: the Qwen2 tokenizer's special tokens, as every Qwen2-VL / Qwen2.5-VL checkpoint numbers them
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
#: processor outputs of a video (the family serves images only for now)
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
#: the Qwen2-VL image processor's defaults (used when no processor is at hand)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
#: the largest number of patches the vision graph is exported for (16384 visual tokens)
MAX_PATCHES = 65536


def patch_layout(image_grid_thw: torch.Tensor, num_patches, merge: int = 2) -> dict[str, torch.Tensor]:
    """Where each of the P flattened patches sits, from the grid alone (tensor arithmetic only, so
    that torch.export keeps P and the number of images dynamic).

    The processor lays out each image's patches frame by frame, then in merge x merge blocks in
    row-major block order, each block row-major. Returns, per patch: `row`, `col` (in patches, the
    vision rotary positions), `block_row`, `block_col` (in merged tokens) and `frame`: the index of
    the first patch of its image frame, equal for two patches iff they attend to each other in a
    full-attention block."""
    grid = image_grid_thw.to(torch.int64)
    frames, height, width = grid[:, 0], grid[:, 1], grid[:, 2]
    sizes = frames * height * width
    ends = torch.cumsum(sizes, dim=0)
    starts = ends - sizes
    patch = torch.arange(num_patches, device=grid.device)
    image = (patch[:, None] >= ends[None, :]).sum(dim=1)  # [P] which image each patch belongs to
    image = image.clamp(max=grid.shape[0] - 1)
    local = patch - starts[image]
    per_frame = (height * width)[image]
    within = local % per_frame
    block, in_block = within // (merge * merge), within % (merge * merge)
    blocks_per_row = width[image] // merge
    block_row, block_col = block // blocks_per_row, block % blocks_per_row
    return {"row": block_row * merge + in_block // merge, "col": block_col * merge + in_block % merge,
            "block_row": block_row, "block_col": block_col,
            "frame": starts[image] + (local // per_frame) * per_frame}


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[P, P] boolean -> additive bias (0 where allowed, the dtype's lowest value elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class QwenVLAdapter(HFDecoderAdapter):
    """Qwen2-VL; Qwen2.5-VL (below) adds window attention in the vision tower."""

    def __init__(self, model):
        self._visual = model.model.visual
        self._vision_module = sys.modules[type(self._visual).__module__]
        super().__init__(model)

    def describe_vision(self) -> dict:
        vision = self.model.config.vision_config
        return {"patch_size": int(vision.patch_size), "temporal_patch_size": int(vision.temporal_patch_size),
                "spatial_merge_size": int(vision.spatial_merge_size), "in_channels": int(vision.in_channels),
                "tokens_per_second": int(getattr(vision, "tokens_per_second", 1) or 1),
                "video_token_id": int(self.model.config.video_token_id),
                "vision_start_token_id": int(self.model.config.vision_start_token_id),
                "mrope_section": [int(x) for x in self._decoder.rotary_emb.mrope_section]}

    # --- vision ------------------------------------------------------------------------------------
    def vision_masks(self, layout: dict) -> dict[int, torch.Tensor]:
        """Block index -> [P, P] boolean: which patches attend to which. Qwen2-VL: every block sees
        its image frame."""
        full = layout["frame"][:, None] == layout["frame"][None, :]
        return {i: full for i in range(len(self._visual.blocks))}

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, C*T*p*p], image_grid_thw [images, 3] -> [P / 4, hidden]: what HF's
        get_image_features returns (concatenated over images), traceable with P dynamic."""
        visual = self._visual
        if not torch.compiler.is_exporting():
            expected = int(image_grid_thw.to(torch.int64).prod(dim=-1).sum())
            if pixel_values.shape[0] != expected:
                raise CapaError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                                f"{image_grid_thw.tolist()} describes {expected}; pass the processor's outputs together")
        hidden = visual.patch_embed(pixel_values.to(visual.patch_embed.proj.weight.dtype))
        layout = patch_layout(image_grid_thw, hidden.shape[0], int(visual.spatial_merge_size))
        cos, sin = visual.rotary_pos_emb(hidden, torch.stack([layout["row"], layout["col"]], dim=-1))
        masks = self.vision_masks(layout)
        biases: dict[int, torch.Tensor] = {}
        for index, block in enumerate(visual.blocks):
            key = id(masks[index])
            if key not in biases:
                biases[key] = attention_bias(masks[index], hidden.dtype)
            hidden = hidden + self._vision_attention(block.attn, block.norm1(hidden), cos, sin, biases[key])
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)

    def _vision_attention(self, attention, x, cos, sin, bias):
        """VisionAttention's eager path over all patches at once, the split by image and window
        given by `bias`."""
        length = x.shape[0]
        q, k, v = attention.qkv(x).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._vision_module.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, P, d]
        scores = (q @ k.transpose(-1, -2)) * attention.scaling + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(0, 1).reshape(length, -1)
        return attention.proj(out)

    # --- decoder -------------------------------------------------------------------------------------


class Qwen2_5VLAdapter(QwenVLAdapter):
    def describe_vision(self) -> dict:
        vision = self.model.config.vision_config
        return {**super().describe_vision(), "window_size": int(vision.window_size),
                "fullatt_block_indexes": [int(i) for i in vision.fullatt_block_indexes]}

    def vision_masks(self, layout: dict) -> dict[int, torch.Tensor]:
        """Full attention within the image frame in the `fullatt_block_indexes` blocks; elsewhere
        within windows of window_size pixels (HF's get_vision_window_index tiles each frame's
        merged-token grid into squares of window_size / merge / patch tokens from the top left)."""
        visual = self._visual
        frame = layout["frame"]
        full = frame[:, None] == frame[None, :]
        side = visual.window_size // visual.spatial_merge_size // visual.patch_size
        window_row, window_col = layout["block_row"] // side, layout["block_col"] // side
        windowed = full & (window_row[:, None] == window_row[None, :]) & (window_col[:, None] == window_col[None, :])
        return {i: full if i in visual.fullatt_block_indexes else windowed for i in range(len(visual.blocks))}


def _rope_index_function(model_class, info: dict):
    """The HF model's own `get_rope_index`, bound to a host that holds only the vision config values
    it reads (so the weights-free family can compute M-RoPE positions from an engine manifest)."""
    vision = SimpleNamespace(spatial_merge_size=int(info["spatial_merge_size"]),
                             tokens_per_second=int(info.get("tokens_per_second", 1)))
    host = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    host.get_vision_position_ids = MethodType(model_class.get_vision_position_ids, host)
    return MethodType(model_class.get_rope_index, host)


@register_family
class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    adapter = QwenVLAdapter
    vision_keys = ("pixel_values", "image_grid_thw")
    # mm_token_type_ids: transformers computes M-RoPE only when it is given (text 0, image 1, video 2)
    text_keys = ("input_ids", "attention_mask", "mm_token_type_ids")
    position_rows = (3,)

    @staticmethod
    def _hf_model_class():
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        return Qwen2VLModel

    @staticmethod
    def _hf_processor_class():
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor

    # --- the graphs ----------------------------------------------------------------------------------
    @property
    def patch_values(self) -> int:
        info = self.info
        return int(info["in_channels"]) * int(info["temporal_patch_size"]) * int(info["patch_size"]) ** 2

    @property
    def pixels_per_token(self) -> int:
        side = int(self.info["patch_size"]) * int(self.info["spatial_merge_size"])
        return side * side

    def vision_graph_io(self):
        pixels = TensorSpec("pixel_values", FLOAT32, (PATCHES, self.patch_values))
        grid = TensorSpec("image_grid_thw", INT64, (IMAGES, 3))
        tokens = Dim("image_tokens", 1, MAX_PATCHES // 4, None)  # all images' tokens (an output: not in profiles)
        return (pixels, grid), TensorSpec("image_features", FLOAT, (tokens, int(self.info["hidden_size"])))

    def pixel_limits(self, processor=None) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the image processor: the area range it resizes images into."""
        size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda key, default=None: getattr(size, key, default)
        low = get("shortest_edge") or get("min_pixels") or self.info.get("min_pixels") or DEFAULT_MIN_PIXELS
        high = get("longest_edge") or get("max_pixels") or self.info.get("max_pixels") or DEFAULT_MAX_PIXELS
        return int(low), int(high)

    def visual_token_range(self, processor=None) -> tuple[int, int]:
        low, high = self.pixel_limits(processor)
        return math.ceil(low / self.pixels_per_token), high // self.pixels_per_token

    def dim_ranges(self, processor, shapes: dict) -> dict[str, tuple[int, int, int]]:
        """The profile's `pixels` range [min, opt, max] (image area after the processor's resize; the
        processor's [min_pixels, max_pixels] when absent), and the patches and visual tokens per
        image it gives."""
        low, high = self.pixel_limits(processor)
        wanted = shapes.get("pixels")
        if wanted is None:
            wanted = (low, min(high, max(low, 448 * 448)), high)
        lo, opt, hi = (int(x) for x in wanted)
        if hi < low or lo > high:
            raise CapaError(f"the profile's shapes.pixels [{lo}, {opt}, {hi}] lies outside the image processor's "
                            f"range [{low}, {high}] (min_pixels, max_pixels): no image would fit; give a range "
                            f"that overlaps it")
        lo, hi = max(lo, low), min(hi, high)
        opt = min(max(opt, lo), hi)
        unit = self.pixels_per_token
        tokens = (math.ceil(lo / unit), max(math.ceil(lo / unit), opt // unit), hi // unit)
        merge = int(self.info["spatial_merge_size"]) ** 2
        return {"pixels": (lo, opt, hi), "visual_tokens": tokens, "patches": tuple(t * merge for t in tokens)}

    # --- inputs ----------------------------------------------------------------------------------------
    def prompt(self, processor, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")

    def check_inputs(self, batch: dict) -> None:
        videos = [k for k in VIDEO_KEYS if batch.get(k) is not None]
        input_ids = batch.get("input_ids")
        if videos or (input_ids is not None and bool((torch.as_tensor(input_ids) == int(self.info["video_token_id"])).any())):
            raise CapaError(f"video inputs are not supported yet ({', '.join(videos) or 'video tokens in input_ids'}); "
                            f"give images")
        if input_ids is not None and batch.get("pixel_values") is not None and batch.get("image_grid_thw") is None:
            raise CapaError("pixel_values were given without image_grid_thw; pass every processor output "
                            "(Qwen-VL images have a dynamic size)")

    def check_image_sizes(self, batch: dict, dims: dict) -> None:
        """Every image's area (after the processor's resize) within the engine's pixel range."""
        if "pixels" not in dims or batch.get("image_grid_thw") is None:
            return
        lo, _, hi = dims["pixels"]
        patch = int(self.info["patch_size"])
        for t, h, w in torch.as_tensor(batch["image_grid_thw"]).tolist():
            area = h * w * patch * patch
            if not lo <= area <= hi:
                raise CapaError(f"an image resized to {h * patch}x{w * patch} = {area} pixels is outside the engine's "
                                f"pixel range [{lo}, {hi}] (profile shapes.pixels); resize the image or rebuild "
                                f"with a profile whose pixel range covers it")

    # --- positions: HF's own M-RoPE -------------------------------------------------------------------
    def prefill_positions(self, batch: dict) -> torch.Tensor:
        """[3, B, L] M-RoPE positions of the prompt, by the HF model's get_rope_index (padding
        positions are 0, as HF makes them)."""
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        types = batch.get("mm_token_type_ids")
        if types is None:  # what the processor makes: image tokens 1, video tokens 2, text 0
            types = (input_ids == self.image_token_id).to(torch.int64)
        grid = batch.get("image_grid_thw")
        if grid is None:  # text only: HF's positions are 0..L-1 on every row
            positions = super().prefill_positions({"input_ids": input_ids})
            return positions.expand(3, *positions.shape)
        rope_index = _rope_index_function(self._hf_model_class(), self.info)
        positions, _ = rope_index(input_ids, mm_token_type_ids=torch.as_tensor(types),
                                  image_grid_thw=torch.as_tensor(grid),
                                  attention_mask=None if mask is None else torch.as_tensor(mask))
        return positions

    # next_position (largest prompt position + 1 per row) and decode_positions (the same value on all
    # three rows) are the base class's: HF decodes at cache_position + rope_delta, with rope_delta =
    # max position + 1 - (real prompt length), which is that value.

    # --- processors ---------------------------------------------------------------------------------------
    @classmethod
    def load_processor(cls, path: str, **kwargs):
        """transformers' Qwen2-VL processors require a video processor, and its video processors need
        torchvision; without it, the same processor class with images only (videos refused)."""
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            return super().load_processor(path, **kwargs)
        return image_only_processor_class(cls._hf_processor_class()).from_pretrained(path, **kwargs)


@register_family
class Qwen2_5VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    adapter = Qwen2_5VLAdapter

    @staticmethod
    def _hf_model_class():
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        return Qwen2_5_VLModel

    @staticmethod
    def _hf_processor_class():
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor


_IMAGE_ONLY: dict[type, type] = {}


def image_only_processor_class(base: type) -> type:
    """`base` (Qwen2VLProcessor / Qwen2_5_VLProcessor) without its video processor: HF's own
    processing of images and text, saved under `base`'s name (so the folder is a standard one)."""
    from transformers.processing_utils import ProcessorMixin

    if base in _IMAGE_ONLY:
        return _IMAGE_ONLY[base]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise CapaError("video inputs are not supported yet; give images")
        return base.__call__(self, images=images, text=text, **kwargs)

    def to_dict(self):
        data = base.to_dict(self)
        data["processor_class"] = base.__name__
        return data

    made = type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__, "__call__": __call__, "to_dict": to_dict,
                                                       "__module__": __name__})
    _IMAGE_ONLY[base] = made
    return made
