"""Requests of the served model, independent of Triton: each one decoded and checked alone (a bad
one is refused with one line naming its input, the others still run), then those asking for the
same number of new tokens run together through CapaEngine.generate_batch (each answer equals the
input alone)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import CapaError
from ..folders import MAX_IMAGE_PIXELS, decode_bounded

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


@dataclass
class Request:
    image: Image.Image
    prompt: str
    max_new_tokens: int


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded image bytes as an RGB PIL image; one line when they are not an image of IMAGE_FORMATS
    or their header claims more than max_pixels pixels (checked before any pixel is decoded)."""
    def too_large(pixels: str) -> CapaError:
        return CapaError(f"image: {pixels} pixels; at most {max_pixels} are decoded: send a smaller image")

    try:
        return decode_bounded(io.BytesIO(data), IMAGE_FORMATS, max_pixels, too_large)
    except CapaError:
        raise
    except UnidentifiedImageError:
        raise CapaError(f"image: {len(data)} bytes in no format this server decodes; send encoded "
                        f"{', '.join(IMAGE_FORMATS)} bytes") from None
    except Exception as exc:  # PIL reports broken bytes as many types (SyntaxError for a bad PNG chunk)
        first = str(exc).splitlines()[0][:100] if str(exc) else ""
        raise CapaError(f"image: {len(data)} bytes that cannot be decoded ({type(exc).__name__}: {first}); send "
                        f"encoded {', '.join(IMAGE_FORMATS)} bytes") from None


def _one(name: str, value, kind: str):
    if value is None:
        return None
    value = np.asarray(value)
    if value.size != 1:
        raise CapaError(f"{name}: shape {list(value.shape)} holds {value.size} values; send one {kind} per request "
                        f"(shape [1, 1])")
    return value.reshape(-1)[0]


def parse_request(image, prompt, max_new_tokens, default_max_new_tokens: int = 32,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> Request:
    """One request's input tensors (numpy arrays, or None where absent) as a Request."""
    data = _one("image", image, "encoded image")
    if data is None:
        raise CapaError("image: missing; send the encoded picture (PNG, JPEG...) as a BYTES input named 'image'")
    if not isinstance(data, bytes):
        raise CapaError(f"image: a {type(data).__name__} value; send the encoded picture as BYTES")
    text = _one("prompt", prompt, "prompt")
    if text is None:
        raise CapaError("prompt: missing; send the question as a BYTES (UTF-8) input named 'prompt'")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CapaError(f"prompt: not UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 text") from None
    if not isinstance(text, str) or not text.strip():
        raise CapaError("prompt: empty; send a question about the image")
    count = _one("max_new_tokens", max_new_tokens, "count")
    count = default_max_new_tokens if count is None else int(count)
    if count < 1:
        raise CapaError(f"max_new_tokens: {count}; ask for at least 1 new token")
    return Request(decode_image(data, max_pixels), text, count)


def check_request(engine, request: Request) -> None:
    """What the engine would refuse for this request alone (prompt longer than its profile, too many
    new tokens for its KV length, image sizes outside its range), refused before any batch runs."""
    inputs = engine.prepare([request.image], [request.prompt])
    engine.check_inputs(inputs, request.max_new_tokens)
    engine.check_images(inputs)


def plan_batches(requests: list[Request], max_batch: int) -> list[list[int]]:
    """Indices of requests run together: the same max_new_tokens (generate_batch takes one), at
    most max_batch per run, in arrival order."""
    groups: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.max_new_tokens, []).append(index)
    return [group[i:i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]


def answer(engine, requests: list[Request]) -> list:
    """A Generation, or the exception that refused it, for each request. A batch the engine
    refuses as a whole (e.g. images of a family whose token counts differ) runs one by one."""
    results: list = [None] * len(requests)
    for indices in plan_batches(requests, engine.max_batch):
        chosen = [requests[i] for i in indices]
        try:
            generations = engine.generate_batch([r.image for r in chosen], [r.prompt for r in chosen],
                                                chosen[0].max_new_tokens)
        except Exception as exc:
            if len(indices) == 1:
                results[indices[0]] = exc
                continue
            generations = []
            for request in chosen:
                try:
                    generations.append(engine.generate(request.image, request.prompt, request.max_new_tokens))
                except Exception as single:
                    generations.append(single)
        for index, generation in zip(indices, generations):
            results[index] = generation
    return results
