"""CapaEngine: inference with a built engine directory (any backend, through Polygraphy runners).

    preprocess (processor) -> vision -> embed + merge image features -> prefill (pruning inside)
    -> greedy decode loop with the per-segment KV cache -> detokenise, streaming tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CapaError
from .manifest import read_manifest

GRAPHS = ("vision", "embed", "prefill", "decode")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    keep_indices: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, prefill, decode_per_token, ...


class CapaEngine:
    """A built engine directory, ready to generate. Use as a context manager, or call close()."""

    def __init__(self, engine_dir: str | Path, *, verify: bool = True, require_complete: bool = True):
        from . import backends
        from .models import adapter_class

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir, verify=verify, require_complete=require_complete)
        backend = backends.BACKENDS[self.manifest["backend"]]
        backend_dir = self.dir / self.manifest["backend_dir"]
        self.runners = {graph: backend.runner(backend_dir, graph) for graph in GRAPHS}
        for runner in self.runners.values():
            runner.activate()
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(self.dir / "processor"))
        self.adapter_class = adapter_class(self.manifest["model"]["family"])
        self.model_info = self.manifest["model"]
        self.layer_segment = self.manifest["layer_segment"]
        self.num_layers = len(self.layer_segment)
        shapes = self.manifest["profile"]["shapes"]
        self.max_sequence, self.max_past, self.max_batch = shapes["sequence"][2], shapes["past"][2], shapes["batch"][2]
        self.queries = self.manifest["capa_config"]["queries"]
        self._input_types: dict[str, dict] = {}

    def close(self):
        for runner in self.runners.values():
            if runner.is_active:
                runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------
    def prepare(self, image, question: str) -> dict:
        prompt = self.adapter_class.prompt_with_image(self.processor, question)
        batch = self.processor(images=image, text=prompt, return_tensors="np")
        return {"input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64),
                "pixel_values": batch["pixel_values"]}

    def _infer(self, graph: str, feed: dict) -> dict:
        runner = self.runners[graph]
        if graph not in self._input_types:
            metadata = runner.get_input_metadata(use_numpy_dtypes=False)
            self._input_types[graph] = {name: meta.dtype.numpy() for name, meta in metadata.items()}
        types = self._input_types[graph]
        feed = {name: np.asarray(value, dtype=types[name]) for name, value in feed.items()}
        # copies: runners may reuse their output buffers between calls
        return {k: np.array(v, copy=True) for k, v in runner.infer(feed).items()}

    def check_inputs(self, input_ids, mask, max_new_tokens: int) -> None:
        """What the engine cannot serve, refused with one line before anything runs."""
        batch, length = input_ids.shape
        if max_new_tokens < 1:
            raise CapaError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if length > self.max_sequence:
            raise CapaError(f"the prompt has {length} tokens but the engine's profile allows at most "
                            f"{self.max_sequence} (shapes.sequence); shorten the prompt or rebuild with a larger profile")
        if length + max_new_tokens > self.max_past:
            raise CapaError(f"{length} prompt tokens + {max_new_tokens} new ones exceed the engine's KV length "
                            f"{self.max_past} (shapes.past); ask for fewer tokens or rebuild with a larger profile")
        if batch > self.max_batch:
            raise CapaError(f"batch {batch} exceeds the engine's profile maximum {self.max_batch} (shapes.batch)")
        if (mask[:, -1] == 0).any():
            raise CapaError("attention_mask has padding at the end of a row (right padding): pad on the left")
        slots = input_ids == self.model_info["image_token_id"]
        counts = slots.sum(axis=1)
        if (counts != counts[0]).any():
            raise CapaError(f"every batch row must hold the same number of image tokens; got {counts.tolist()}")
        if self.queries == "text" and counts[0] and (np.argwhere(slots)[:, 1].max() >= length - 1):
            raise CapaError("the prompt has no text after the image to score visual tokens with")

    def generate_ids(self, input_ids, pixel_values, attention_mask=None, max_new_tokens: int = 16,
                     eos_token_id: int | None = None, stream: Callable[[int], None] | None = None,
                     forced_tokens=None):
        """Greedy generation from model inputs. Returns (tokens [B, T], keep_indices [B, k], timings).

        forced_tokens [B, T]: teacher forcing (validation): each step is fed the given token, and the
        returned tokens are the engine's argmax predictions at each step."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, length = input_ids.shape
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        self.check_inputs(input_ids, mask, max_new_tokens)
        timings = {}
        start = time.perf_counter()
        features = self._infer("vision", {"pixel_values": pixel_values})
        timings["vision"] = time.perf_counter() - start
        start = time.perf_counter()
        embeds = self._infer("embed", {"input_ids": input_ids})["inputs_embeds"]
        slots = input_ids == self.model_info["image_token_id"]
        image_features = features["image_features"]
        if int(slots.sum()) != image_features.shape[0] * image_features.shape[1]:
            raise CapaError(f"the prompt has {int(slots.sum())} image-token slots but the images give "
                            f"{image_features.shape[0] * image_features.shape[1]} features")
        embeds[slots] = image_features.reshape(-1, embeds.shape[-1])
        counts = slots.sum(axis=1)
        visual_positions = np.stack([np.nonzero(row)[0] for row in slots]).astype(np.int64).reshape(batch, int(counts[0]))
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        timings["embed"] = time.perf_counter() - start
        start = time.perf_counter()
        out = self._infer("prefill", {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                      "visual_positions": visual_positions})
        timings["prefill"] = time.perf_counter() - start
        timings["time_to_first_token"] = timings["vision"] + timings["embed"] + timings["prefill"]
        keep = out["keep_indices"]
        segments = max(self.layer_segment) + 1
        masks = [out[f"segment_mask.{s}"] for s in range(segments)]
        past = {f"past.{i}.{kv}": out[f"present.{i}.{kv}"] for i in range(self.num_layers) for kv in ("key", "value")}
        token = out["logits"].argmax(-1)[:, None].astype(np.int64)
        tokens = [token]
        if stream:
            stream(int(token[0, 0]))
        next_position = np.full((batch, 1), length, dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        start = time.perf_counter()
        for step_index in range(max_new_tokens - 1):
            if forced_tokens is not None:
                token = np.asarray(forced_tokens, dtype=np.int64)[:, step_index:step_index + 1]
            elif eos_token_id is not None:
                finished |= token[:, 0] == eos_token_id
                if finished.all():
                    break
            new_embeds = self._infer("embed", {"input_ids": token})["inputs_embeds"]
            feed = {"inputs_embeds": new_embeds, "position_ids": next_position, **past}
            feed.update({f"past_segment_mask.{s}": masks[s] for s in range(segments)})
            step = self._infer("decode", feed)
            past = {f"past.{i}.{kv}": step[f"present.{i}.{kv}"] for i in range(self.num_layers) for kv in ("key", "value")}
            masks = [np.concatenate([m, np.ones((batch, 1), dtype=m.dtype)], axis=1) for m in masks]
            next_position = next_position + 1
            token = step["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            if eos_token_id is not None and forced_tokens is None:
                token[finished] = eos_token_id  # finished rows stay finished
            tokens.append(token)
            if stream:
                stream(int(token[0, 0]))
        steps = len(tokens) - 1
        timings["decode_total"] = time.perf_counter() - start
        timings["decode_per_token"] = timings["decode_total"] / steps if steps else 0.0
        return np.concatenate(tokens, axis=1), keep, timings

    def generate(self, image, question: str, max_new_tokens: int = 32,
                 stream: Callable[[str], None] | None = None) -> Generation:
        inputs = self.prepare(image, question)
        tokenizer = self.processor.tokenizer
        on_token = (lambda t: stream(tokenizer.decode([t], skip_special_tokens=True))) if stream else None
        tokens, keep, timings = self.generate_ids(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                                  max_new_tokens, tokenizer.eos_token_id, on_token)
        text = tokenizer.decode(tokens[0], skip_special_tokens=True)
        return Generation(text, tokens[0].tolist(), keep[0].tolist(), int(inputs["input_ids"].shape[1]), timings)
