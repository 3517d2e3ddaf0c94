"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, the llava-v1.6 checkpoints): LLaVA-1.5's CLIP
tower, projector and Vicuna / Mistral decoder, with "anyres" images.

What sets this family apart from LLaVA-1.5:

- **Anyres tiling.** The processor picks, among `image_grid_pinpoints`, the resolution that keeps
  most of the image, resizes and pads the image to it and cuts it into 336 x 336 crops, after a
  base crop of the whole image: `pixel_values` [images, crops, 3, 336, 336] (a batch's images
  padded with empty crops to the most crops) and `image_sizes` [images, 2] (height, width).
- **Packing.** Each crop gives 576 features; the grid crops are put side by side, the rows and
  columns that only cover the padding are cut ("unpad", from `image_sizes`), and the learned
  `image_newline` vector ends each row of the grid. An image is 576 base tokens followed by
  rows x (columns + 1) grid tokens: up to 2,928 with the default pinpoints.

Where packing happens: on the host, in `pack_image_features`, which the CapaModel and the engine
runtime call between the vision graph and the merge. The vision graph (traced with the number of
images and of crops dynamic) runs every crop through the tower and the projector and returns the
crop features flattened, followed by one row, `image_newline`; packing is HF's own
`pack_image_features` (bound to the few config values it reads), so engines pack exactly as HF
does, and the graph has no shape that depends on pixel values.

Newline tokens carry layout, not content: by default they are not pruning candidates (they stay in
the sequence like text, take the full FFN and keep their rotary positions); `CapaConfig(
prune_layout_tokens=True)` makes them candidates like the patch tokens. `layout_token_mask`
reports them; `visual_positions` leaves them out unless told otherwise.
"""

from __future__ import annotations

from types import MethodType, SimpleNamespace

import torch

from ..contract import FLOAT, FLOAT32, IMAGES, Dim, TensorSpec
from ..errors import CapaError
from .llava import LlavaAdapter, LlavaFamily, bench_config_parts
from .registry import register_family

#: the real checkpoints' pinpoints (height, width): 1 x 2, 2 x 1, 2 x 2, 1 x 3 and 3 x 1 crops of 336
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
#: crops the vision graph is exported for, per image (base crop + grid crops)
MAX_CROPS = 64


class LlavaNextAdapter(LlavaAdapter):
    def describe_vision(self) -> dict:
        cfg = self.model.config
        vision = cfg.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return {"image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
                "visual_tokens_per_image": side * side,  # per crop
                "image_grid_pinpoints": [[int(h), int(w)] for h, w in cfg.image_grid_pinpoints],
                "vision_feature_select_strategy": str(cfg.vision_feature_select_strategy)}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [images, crops, 3, S, S] -> [images * crops * 576 + 1, hidden]: every crop's
        projected features (LLaVA-1.5's path), flattened, then the learned `image_newline` as the last
        row (what the host-side packing needs besides `image_sizes`)."""
        if pixel_values.dim() != 5:
            raise CapaError(f"pixel_values has shape {tuple(pixel_values.shape)}; {self.family.title} takes the "
                            f"processor's [images, crops, 3, height, width]")
        crops = super().image_features(pixel_values.flatten(0, 1))
        newline = self.model.model.image_newline.to(crops.dtype)
        return torch.cat([crops.reshape(-1, crops.shape[-1]), newline[None]], dim=0)


def _hf_packer(info: dict, model_class=None):
    """HF's own `pack_image_features` of `model_class` (default `LlavaNextModel`), bound to a host
    holding only the config values it reads (so the weights-free family packs exactly as the HF model
    does)."""
    if model_class is None:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel as model_class

    vision = SimpleNamespace(image_size=int(info["image_size"]), patch_size=int(info["patch_size"]))
    host = SimpleNamespace(config=SimpleNamespace(vision_config=vision,
                                                  image_grid_pinpoints=[list(p) for p in info["image_grid_pinpoints"]]))
    return MethodType(model_class.pack_image_features, host)


@register_family
class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    adapter = LlavaNextAdapter
    #: the family's name in messages
    title = "LLaVA-NeXT"
    # image_sizes: kept for the host-side packing (not a vision-graph input)
    text_keys = ("input_ids", "attention_mask", "image_sizes")
    #: random-weight models of real sizes for `capa-export bench` (llava-v1.6-vicuna-7b's decoder and
    #: CLIP-L/336 tower); the visual tokens fed are the most one image gives (visual_token_range)
    bench_sizes = {
        # the "mid" decoder (llava.py) with LLaVA-NeXT's anyres prompt: what a CPU can time
        "llava-next-mid": dict(hidden=1024, layers=16, heads=16, kv_heads=16, intermediate=2816, vocab=32064,
                               vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096),
        "llava-next-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32064,
                              vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096),
    }

    # --- geometry ------------------------------------------------------------------------------------
    @property
    def crop_tokens(self) -> int:
        return int(self.info["visual_tokens_per_image"])

    @property
    def pinpoints(self) -> list[list[int]]:
        return [list(p) for p in self.info["image_grid_pinpoints"]]

    def grid(self, image_size) -> tuple[int, int]:
        """(rows, columns) of crops the processor cuts an image of (height, width) into."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        return get_anyres_image_grid_shape([int(x) for x in image_size], self.pinpoints, int(self.info["image_size"]))

    def crops(self, image_size) -> int:
        rows, cols = self.grid(image_size)
        return 1 + rows * cols

    def unpadded_grid(self, image_size) -> tuple[int, int]:
        """(rows, columns) of grid tokens left after unpadding (the processor's own count)."""
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        rows, cols = self.grid(image_size)
        side = int(self.info["image_size"]) // int(self.info["patch_size"])
        height, width = (int(x) for x in image_size)
        tokens, newlines = LlavaNextProcessor._get_unpadded_features(None, height, width, side, side, rows, cols)
        return newlines, (tokens // newlines if newlines else 0)

    def image_crops(self, batch: dict) -> list[int]:
        """Crops of each image of a batch (base + grid), from its size."""
        return [self.crops(size) for size in torch.as_tensor(batch["image_sizes"]).tolist()]

    def image_layouts(self, batch: dict) -> list[tuple[int, int]]:
        """(rows, columns) of each image's grid tokens after the base crop: a newline ends each row."""
        return [self.unpadded_grid(size) for size in torch.as_tensor(batch["image_sizes"]).tolist()]

    def image_tokens(self, image_size) -> int:
        """Image tokens (base, grid and newlines) of an image of (height, width)."""
        rows, cols = self.unpadded_grid(image_size)
        return self.crop_tokens + rows * (cols + 1)

    def bench_image_size(self) -> list[int]:
        """The pinpoint whose image gives the most tokens (672 x 672 with the real pinpoints: 2,928)."""
        return max(self.pinpoints, key=self.image_tokens)

    def _grid_extremes(self) -> tuple[int, int]:
        crops = [1 + (h // int(self.info["image_size"])) * (w // int(self.info["image_size"])) for h, w in self.pinpoints]
        return min(crops), max(crops)

    def visual_token_range(self, processor=None) -> tuple[int, int]:
        """(fewest, most) pruning candidates of one image: the base crop's 576 always (an image of
        extreme aspect ratio unpads to almost no grid rows), up to a full grid of the largest
        pinpoint with its newlines (an upper bound for either newline choice)."""
        side = int(self.info["image_size"]) // int(self.info["patch_size"])
        most = max((h // int(self.info["image_size"])) * side * ((w // int(self.info["image_size"])) * side + 1)
                   for h, w in self.pinpoints)
        return self.crop_tokens, self.crop_tokens + most

    def dim_ranges(self, processor, shapes: dict) -> dict[str, tuple[int, int, int]]:
        """Visual tokens (candidates) per image, crops per image and the vision graph's output rows,
        from the pinpoints (which the processor must share with the model: it cuts the crops)."""
        theirs = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        if theirs is not None and [list(p) for p in theirs] != self.pinpoints:
            raise CapaError(f"the processor's image_grid_pinpoints {[list(p) for p in theirs]} differ from the model's "
                            f"{self.pinpoints}; save the processor that belongs to the model")
        low, high = self.visual_token_range(processor)
        fewest, most = self._grid_extremes()
        return {"visual_tokens": (low, high, high), "crops": (fewest, most, most),
                "crop_tokens": (fewest * self.crop_tokens + 1, most * self.crop_tokens + 1,
                                most * self.crop_tokens + 1)}

    # --- the graphs ----------------------------------------------------------------------------------
    def vision_graph_io(self):
        size = int(self.info["image_size"])
        crops = Dim("crops", 1, MAX_CROPS, None)  # given at build time from dim_ranges
        pixels = TensorSpec("pixel_values", FLOAT32, (IMAGES, crops, 3, size, size))
        rows = Dim("crop_tokens", 2, IMAGES.max * MAX_CROPS * self.crop_tokens + 1, None)  # an output
        return (pixels,), TensorSpec("image_features", FLOAT, (rows, int(self.info["hidden_size"])))

    # --- inputs ----------------------------------------------------------------------------------------
    def check_inputs(self, batch: dict) -> None:
        """pixel_values and image_sizes given together and consistent: one size per image, and as
        many crops as the size needs (at most the pixel tensor's crop axis)."""
        pixels, sizes = batch.get("pixel_values"), batch.get("image_sizes")
        if pixels is None:
            return
        if sizes is None:
            raise CapaError(f"pixel_values were given without image_sizes; pass every processor output "
                            f"({self.title} unpads each image by its size)")
        shape, sizes = tuple(torch.as_tensor(pixels).shape), torch.as_tensor(sizes)
        if len(shape) != 5:
            raise CapaError(f"pixel_values has shape {shape}; {self.title} takes the processor's "
                            f"[images, crops, 3, height, width]")
        if sizes.dim() != 2 or sizes.shape[1] != 2 or sizes.shape[0] != shape[0]:
            raise CapaError(f"image_sizes has shape {tuple(sizes.shape)} but pixel_values holds {shape[0]} image(s); "
                            f"give one (height, width) per image, as the processor makes them")
        for index, size in enumerate(sizes.tolist()):
            if min(size) < 1:
                raise CapaError(f"image_sizes[{index}] = {size} is not an image size; give (height, width) >= 1")
        for index, (size, needed) in enumerate(zip(sizes.tolist(), self.image_crops(batch))):
            if needed > shape[1]:
                raise CapaError(f"image_sizes[{index}] = {size} needs {needed} crops but pixel_values holds {shape[1]}; "
                                f"image_sizes and pixel_values must come from the same processor call")

    def check_image_sizes(self, batch: dict, dims: dict) -> None:
        """No image needs more crops than the engine's profile was built for."""
        if "crops" not in dims or batch.get("image_sizes") is None:
            return
        most = dims["crops"][2]
        for size in torch.as_tensor(batch["image_sizes"]).tolist():
            if self.crops(size) > most:
                raise CapaError(f"an image of {size[0]}x{size[1]} pixels is cut into {self.crops(size)} crops but the "
                                f"engine takes at most {most} (its image_grid_pinpoints); resize the image or rebuild")

    def image_count(self, batch: dict) -> int:
        # the processor's image tokens run together per image (base, grid, newlines): one run each
        sizes = batch.get("image_sizes")
        return super().image_count(batch) if sizes is None else int(torch.as_tensor(sizes).shape[0])

    # --- between the graphs --------------------------------------------------------------------------
    def pack_image_features(self, image_features: torch.Tensor, batch: dict) -> torch.Tensor:
        """The vision output [images * crops * 576 + 1, D] -> the packed image tokens of every image
        [tokens, D], as HF's get_image_features makes them (base crop, unpadded grid, a newline per row)."""
        sizes = torch.as_tensor(batch["image_sizes"])
        images, crops = torch.as_tensor(batch["pixel_values"]).shape[:2]
        newline = image_features[-1]
        per_crop = image_features[:-1].reshape(images, crops, self.crop_tokens, image_features.shape[-1])
        pieces = [per_crop[i, :needed] for i, needed in enumerate(self.image_crops(batch))]
        return torch.cat(self._hf_pack(pieces, sizes, newline), dim=0)

    def _hf_pack(self, pieces: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        """Each image's crop features [crops, 576, D] -> its packed tokens, by HF's own packing."""
        strategy = self.info.get("vision_feature_select_strategy", "default")
        packed, _ = _hf_packer(self.info)(pieces, sizes, strategy, image_newline=newline)
        return packed

    def layout_token_mask(self, batch: dict) -> torch.Tensor:
        """[B, L] True at the newline tokens: each image's tokens are, in order, 576 base tokens, then
        per unpadded grid row its columns and one newline. Images are taken in order, row by row."""
        input_ids = torch.as_tensor(batch["input_ids"])
        sizes = batch.get("image_sizes")
        is_image = input_ids == self.image_token_id
        mask = torch.zeros_like(is_image)
        if not bool(is_image.any()):
            return mask
        if sizes is None:
            raise CapaError(f"input_ids hold {self.title} image tokens but image_sizes was not given; pass every "
                            f"processor output")
        layouts = self.image_layouts(batch)
        image = 0
        for row in range(input_ids.shape[0]):
            slots = is_image[row].nonzero()[:, 0].tolist()
            start = 0
            while start < len(slots):
                if image >= len(layouts):
                    raise CapaError(f"input_ids hold more image tokens than the {len(layouts)} image(s) of image_sizes "
                                    f"give; the prompt needs one image placeholder per image")
                rows, cols = layouts[image]
                for r in range(rows):
                    mask[row, slots[start + self.crop_tokens + r * (cols + 1) + cols]] = True
                start += self.crop_tokens + rows * (cols + 1)
                image += 1
        return mask

    @classmethod
    def bench_model(cls, size: str, device: str):
        """(random-weight fp32 LLaVA-NeXT model, visual tokens to feed) of a benchmark size."""
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        spec = cls.bench_sizes[size]
        config = LlavaNextConfig(**bench_config_parts(spec), image_grid_pinpoints=DEFAULT_PINPOINTS)
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config)
        return model, LlavaNextAdapter(model).family.visual_token_range()[1]
