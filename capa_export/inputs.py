"""Inputs: images and questions from the user (files, a folder), or a small built-in set made in code.

The built-in set needs no download: synthetic images (shapes, gradients, stripes, text-like
glyph rows, noise) with varied questions, deterministic from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import folders
from .errors import CapaError
from .folders import MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: refused by name: no family takes video input yet
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
PROMPTS_FILE = "prompts.txt"
#: an image smaller than this on a side is taken with a warning (a patch of the smallest encoder is 14 px)
MIN_IMAGE_SIDE = 14
DEFAULT_QUESTIONS = (
    "What is in the picture?",
    "Describe the image in detail.",
    "What colours do you see?",
    "How many objects are there?",
    "Is there any text in this image? Read it.",
    "Where is the largest shape?",
)


@dataclass
class CalibrationSample:
    image: Image.Image
    question: str
    source: str


def synthetic_image(index: int, size: int = 336, seed: int = 0) -> Image.Image:
    """One of five kinds of synthetic picture, chosen by index, varied by the seed."""
    rng = np.random.default_rng(seed * 7919 + index)
    kind = index % 5
    if kind == 0:  # smooth colour gradient
        y, x = np.mgrid[0:size, 0:size] / size
        c = rng.uniform(0, 1, size=(3, 3))
        pixels = np.stack([c[i, 0] * x + c[i, 1] * y + c[i, 2] * x * y for i in range(3)], axis=-1)
        return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    background = tuple(int(v) for v in rng.integers(0, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if kind == 1:  # shapes
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = rng.integers(0, size - 40, size=2)
            w, h = rng.integers(20, size // 2, size=2)
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            box = [int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    elif kind == 2:  # stripes
        period = int(rng.integers(8, 48))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        for start in range(0, size, period):
            draw.rectangle([start, 0, start + period // 2, size], fill=colour)
    elif kind == 3:  # text-like rows of glyphs
        for row in range(int(rng.integers(3, 9))):
            y = 20 + row * 36
            text = "".join(chr(int(c)) for c in rng.integers(65, 91, size=int(rng.integers(6, 20))))
            draw.text((16, y), text, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    else:  # noise over a blob
        noise = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        image = Image.blend(image, Image.fromarray(noise), 0.35)
        ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=background[::-1])
    return image


def builtin_samples(count: int = 8, seed: int = 0) -> list[CalibrationSample]:
    return [
        CalibrationSample(synthetic_image(i, seed=seed), DEFAULT_QUESTIONS[i % len(DEFAULT_QUESTIONS)], f"builtin:{i}")
        for i in range(count)
    ]


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as RGB, or one line naming it: a video, unreadable, not PNG/JPEG/WebP/BMP/GIF,
    or claiming more than max_pixels pixels in its header (checked before any pixel is decoded: a
    small file can claim gigabytes of pixels)."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        raise CapaError(f"{path} is a video; video inputs are not supported yet: give an image (PNG or JPEG)")
    image = folders.open_image(path, max_pixels=max_pixels)
    if min(image.size) < MIN_IMAGE_SIDE:
        from .logs import logger

        # taken (a processor resizes any image), but a person should know the answer rests on a few pixels
        logger.warning(f"warning: image {path} is {image.size[0]} x {image.size[1]} pixels, smaller than "
                       f"{MIN_IMAGE_SIDE} on a side: it is upscaled to the model's input and says little")
    return image


def check_prompt(prompt, where: str = "--prompt") -> str:
    """A question with something in it; an empty one is refused (the model would answer the image
    alone, which is not what a person who typed a prompt meant)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise CapaError(f"{where} {prompt!r} is empty; give a question about the image")
    return prompt


def folder_samples(folder: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> list[CalibrationSample]:
    """Images in a folder, with questions from `prompts.txt` (one per line, cycled) or, per image,
    a sidecar `<stem>.txt`; the default questions otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CapaError(f"calibration folder {folder} does not exist; give a folder of images (+ optional prompts.txt)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CapaError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    shared = []
    if (folder / PROMPTS_FILE).is_file():
        shared = [line.strip() for line in _read_text(folder / PROMPTS_FILE).splitlines() if line.strip()]
    samples = []
    for i, path in enumerate(images):
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file() and _read_text(sidecar).strip():
            question = _read_text(sidecar).strip()
        elif shared:
            question = shared[i % len(shared)]
        else:
            question = DEFAULT_QUESTIONS[i % len(DEFAULT_QUESTIONS)]
        samples.append(CalibrationSample(open_image(path, max_pixels), question, str(path)))
    return samples


def _read_text(path: Path) -> str:
    """A prompt file: a regular file of at most 1 MiB, as UTF-8 text."""
    return folders.read_bytes(path, max_bytes=1 << 20).decode("utf-8", errors="replace")


def encode(adapter, processor, sample: CalibrationSample) -> dict:
    """Model inputs for one sample: the processor outputs the model's family needs, on its device."""
    batch = adapter.family.encode(processor, [sample.image], [sample.question])
    device = adapter.lm_head.weight.device
    return {k: v.to(device) for k, v in batch.items()}
