"""CapaEngine: inference with a built engine directory (any backend, through Polygraphy runners).

    preprocess (processor) -> vision -> embed + merge image features -> prefill (pruning inside)
    -> greedy decode loop with the per-segment KV cache -> detokenise, streaming tokens.

What happens between the graphs (merging image features, rotary positions) is the model family's
own code (`capa_export/models/`), the same the exporter traced; the graphs' names come from the
family's graph contract, which the engine manifest records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .contract import GRAPHS, to_feed_array
from .dtypes import float_type
from .errors import CapaError
from .manifest import read_manifest


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
        from .models import family_from_info

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir, verify=verify, require_complete=require_complete)
        self.family = family_from_info(self.manifest["model"])
        self.contract = self.family.graph_contract(self.manifest["layer_segment"])
        self.float_type = float_type(self.manifest["dtype"])
        backend = backends.get(self.manifest["backend"])
        backend_dir = self.dir / self.manifest["backend_dir"]
        self.runners = {graph: backend.runner(backend_dir, graph) for graph in GRAPHS}
        for runner in self.runners.values():
            runner.activate()
        self.processor = self.family.load_processor(str(self.dir / "processor"))
        shapes = self.manifest["profile"]["shapes"]
        self.max_sequence, self.max_past, self.max_batch = shapes["sequence"][2], shapes["past"][2], shapes["batch"][2]
        self.queries = self.manifest["capa_config"]["queries"]

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
        """The processor outputs of one image and question (torch tensors)."""
        return self.family.encode(self.processor, [image], [question])

    def _infer(self, graph: str, values: dict) -> dict:
        """Run one graph on host tensors (keyed by the contract's input names); torch outputs."""
        spec = self.contract[graph]
        feed = {}
        for tensor in spec.inputs:
            feed[tensor.name] = to_feed_array(tensor, values[tensor.name], self.float_type.name)
        # copies: runners may reuse their output buffers between calls
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.runners[graph].infer(feed).items()}

    def check_inputs(self, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
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
        if bool((mask[:, -1] == 0).any()):
            raise CapaError("attention_mask has padding at the end of a row (right padding): pad on the left")
        slots = self.family.visual_positions(input_ids)  # refuses rows with different image-token counts
        if self.queries == "text" and slots.shape[1] and int(slots.max()) >= length - 1:
            raise CapaError("the prompt has no text after the image to score visual tokens with")

    def check_images(self, batch: dict) -> None:
        """Images the engine cannot serve (videos, more images than its profile, sizes outside its
        pixel range), refused with one line before anything runs."""
        self.family.check_inputs(batch)
        images, most = self.family.image_count(batch), self.manifest["profile"]["shapes"]["images"][2]
        if images > most:
            raise CapaError(f"the input holds {images} images but this engine takes at most {most} per batch "
                            f"(profile shapes.images); give one image per prompt, or rebuild with a larger images range")
        self.family.check_image_sizes(batch, self.manifest.get("vision_dims", {}))

    def generate_ids(self, batch: dict, max_new_tokens: int = 16, eos_token_id: int | None = None,
                     stream: Callable[[int], None] | None = None, forced_tokens=None):
        """Greedy generation from processor outputs (torch tensors or numpy arrays). Returns
        (tokens [B, T], keep_indices [B, k], timings) as numpy arrays and a dict of seconds.

        forced_tokens [B, T]: teacher forcing (validation): each step is fed the given token, and the
        returned tokens are the engine's argmax predictions at each step."""
        batch = {k: torch.as_tensor(v) for k, v in batch.items()}
        input_ids = batch["input_ids"].to(torch.int64)
        rows, length = input_ids.shape
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(torch.int64)
        batch.update(input_ids=input_ids, attention_mask=mask)
        self.check_inputs(input_ids, mask, max_new_tokens)
        self.check_images(batch)
        family = self.family
        timings = {}
        start = time.perf_counter()
        vision_inputs = {k: batch[k] for k in family.vision_keys}
        features = self._infer("vision", vision_inputs)["image_features"]
        timings["vision"] = time.perf_counter() - start
        start = time.perf_counter()
        embeds = self._infer("embed", {"input_ids": input_ids})["inputs_embeds"]
        embeds = family.merge_image_features(input_ids, embeds, features)
        positions = family.prefill_positions(batch)
        timings["embed"] = time.perf_counter() - start
        start = time.perf_counter()
        out = self._infer("prefill", {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                      "visual_positions": family.visual_positions(input_ids)})
        timings["prefill"] = time.perf_counter() - start
        timings["time_to_first_token"] = timings["vision"] + timings["embed"] + timings["prefill"]
        keep = out["keep_indices"]
        cache = self.contract.cache_from_prefill(out)
        token = out["logits"].argmax(-1)[:, None]
        tokens = [token]
        if stream:
            stream(int(token[0, 0]))
        next_position = family.next_position(positions)
        finished = torch.zeros(rows, dtype=torch.bool)
        grow = lambda m: torch.cat([m, torch.ones(rows, 1, dtype=m.dtype)], dim=1)  # noqa: E731
        start = time.perf_counter()
        for step_index in range(max_new_tokens - 1):
            if forced_tokens is not None:
                token = torch.as_tensor(np.asarray(forced_tokens), dtype=torch.int64)[:, step_index:step_index + 1]
            elif eos_token_id is not None:
                finished |= token[:, 0] == eos_token_id
                if bool(finished.all()):
                    break
            new_embeds = self._infer("embed", {"input_ids": token})["inputs_embeds"]
            step = self._infer("decode", {"inputs_embeds": new_embeds,
                                          "position_ids": family.decode_positions(next_position, 1), **cache})
            cache = self.contract.next_cache(cache, step, grow)
            next_position = next_position + 1
            token = step["logits"][:, -1].argmax(-1)[:, None]
            if eos_token_id is not None and forced_tokens is None:
                token[finished] = eos_token_id  # finished rows stay finished
            tokens.append(token)
            if stream:
                stream(int(token[0, 0]))
        steps = len(tokens) - 1
        timings["decode_total"] = time.perf_counter() - start
        timings["decode_per_token"] = timings["decode_total"] / steps if steps else 0.0
        return torch.cat(tokens, dim=1).numpy(), keep.numpy(), timings

    def generate(self, image, question: str, max_new_tokens: int = 32,
                 stream: Callable[[str], None] | None = None) -> Generation:
        inputs = self.prepare(image, question)
        tokenizer = self.processor.tokenizer
        on_token = (lambda t: stream(tokenizer.decode([t], skip_special_tokens=True))) if stream else None
        tokens, keep, timings = self.generate_ids(inputs, max_new_tokens, tokenizer.eos_token_id, on_token)
        text = tokenizer.decode(tokens[0], skip_special_tokens=True)
        return Generation(text, tokens[0].tolist(), keep[0].tolist(), int(inputs["input_ids"].shape[1]), timings)
