"""CapaEngine: inference with a built engine directory (any backend).

    preprocess (processor) -> vision -> embed + merge image features -> prefill (pruning inside)
    -> greedy decode loop with the per-segment KV cache -> detokenise, streaming text.

The graphs run as the backend's engine graphs (`Backend.graph`): with ONNX Runtime, torch tensors
go in through IO binding, and the KV cache stays in ONNX Runtime between decode steps (only each
step's logits come back to the host: one sync per token). Batches of several images and prompts
are left-padded and run together; each answer equals the same input run alone.

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

from .contract import GRAPHS
from .dtypes import float_type
from .errors import CapaError
from .manifest import read_manifest


def engine_family(manifest: dict, directory: Path):
    """(ModelFamily, GraphContract) from an engine manifest's model description; what the schema
    cannot check (a family's own keys, their values) refused in one line."""
    from .models import family_from_info

    try:
        family = family_from_info(manifest["model"])
        contract = family.graph_contract(manifest["layer_segment"])
        family.visual_token_range()
    except CapaError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        detail = f"key {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:120]
        raise CapaError(f"{directory}/manifest.json: model / layer_segment do not describe a model its family can "
                        f"serve ({detail}); rebuild the engine") from None
    return family, contract


def engine_backend(directory: Path, manifest: dict):
    """(Backend, its folder, the file table relative to that folder) of an engine whose manifest
    passed read_manifest, after the backend's own description was checked (no runtime needed)."""
    from .backends import names
    from .backends.base import BACKENDS
    from .folders import confined_directory

    names()  # every backend module registered
    backend = BACKENDS[manifest["backend"]]  # the schema allows only registered names
    backend_dir = confined_directory(directory, manifest["backend_dir"], source=f"{directory}/manifest.json: backend_dir")
    prefix = manifest["backend_dir"] + "/"
    files = {name[len(prefix):]: entry for name, entry in manifest["files"].items() if name.startswith(prefix)}
    backend.check_folder(backend_dir, files)
    return backend, backend_dir, files


@dataclass
class Generation:
    text: str
    tokens: list[int]
    keep_indices: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, prefill, decode_per_token, ...


class CapaEngine:
    """A built engine directory, ready to generate. Use as a context manager, or call close().

    The folder is untrusted input, checked before anything is loaded from it (README, "Security"):
    the manifest (bounded strict JSON, schema, format version), the folder holding exactly the
    files its table lists (no link, special file or hidden entry; sha256 unless verify=False),
    backend_dir the backend's own folder, the backend's description and every path it names, the
    processor (no code, no download), then each graph's inputs and outputs against the model
    family's spec before its session is created.

    trust: a PEM public key (bytes or path): the manifest's Ed25519 signature must verify with it.
    provider / threads: where the graphs run (one of the providers the engine was built for) and on
    how many threads (ONNX Runtime).
    plugin_library / allow_engine_code: TensorRT only (the plugin library to use instead of the
    installed one; whether plans that carry code may be deserialised)."""

    def __init__(self, engine_dir: str | Path, *, verify: bool = True, require_complete: bool = True,
                 trust=None, provider: str | None = None, threads: int | None = None,
                 plugin_library: str | None = None, allow_engine_code: bool = False):
        if threads is not None and threads < 1:
            raise CapaError(f"threads={threads} must be >= 1")
        from .folders import confined_directory, load_local_processor

        self.dir = Path(engine_dir)
        self.graphs = {}
        self.manifest = read_manifest(self.dir, verify=verify, require_complete=require_complete, trust=trust)
        self.family, self.contract = engine_family(self.manifest, self.dir)
        self.float_type = float_type(self.manifest["dtype"])
        backend, backend_dir, files = engine_backend(self.dir, self.manifest)
        self.processor = load_local_processor(confined_directory(self.dir, "processor", source=str(self.dir)),
                                              loader=self.family.load_processor)
        shapes = self.manifest["profile"]["shapes"]
        self.max_sequence, self.max_past, self.max_batch = shapes["sequence"][2], shapes["past"][2], shapes["batch"][2]
        self.queries = self.manifest["capa_config"]["queries"]
        backend.require()
        try:  # sessions made before a failure are released, not left to the garbage collector
            for graph in GRAPHS:
                self.graphs[graph] = backend.graph(backend_dir, graph, spec=self.contract[graph],
                                                   dtype=self.manifest["dtype"], files=files, provider=provider,
                                                   threads=threads, plugin_library=plugin_library,
                                                   allow_engine_code=allow_engine_code)
        except BaseException:
            self.close()
            raise

    def close(self):
        for graph in self.graphs.values():
            graph.close()
        self.graphs = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------
    def prepare(self, images, questions) -> dict:
        """The processor outputs of images and questions (one image per question; lists, or one
        of each), left-padded into one batch (torch tensors)."""
        from .folders import chat_template_errors

        images = list(images) if isinstance(images, (list, tuple)) else [images]
        questions = [questions] if isinstance(questions, str) else list(questions)
        if len(images) != len(questions):
            raise CapaError(f"{len(images)} images and {len(questions)} prompts: give one image per prompt")
        if len(questions) > self.max_batch:
            raise CapaError(f"{len(questions)} prompts exceed the engine's batch maximum {self.max_batch} "
                            f"(shapes.batch); run fewer at once or rebuild with a larger profile")
        # the family renders the folder's chat template: its failures are the folder's fault
        with chat_template_errors(f"the chat template of {self.dir}/processor"):
            return self.family.encode(self.processor, images, questions)

    def _run(self, graph: str, inputs: dict) -> dict:
        return self.graphs[graph].run(inputs)

    def _tensor(self, graph: str, handle):
        return self.graphs[graph].tensor(handle)

    def visual_positions(self, batch: dict) -> torch.Tensor:
        """The pruning candidates' slots, as the engine's CAPA config chose them (layout tokens or not)."""
        return self.family.visual_positions(batch["input_ids"], batch,
                                            layout_candidates=self.manifest["capa_config"].get("prune_layout_tokens",
                                                                                               False))

    def check_inputs(self, batch: dict, max_new_tokens: int) -> None:
        """What the engine cannot serve, refused with one line before anything runs."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, length = input_ids.shape
        if max_new_tokens < 1:
            raise CapaError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if length > self.max_sequence:
            raise CapaError(f"the prompt has {length} tokens but the engine's profile allows at most "
                            f"{self.max_sequence} (shapes.sequence); shorten the prompt or rebuild with a larger profile")
        if length + max_new_tokens > self.max_past:
            raise CapaError(f"{length} prompt tokens + {max_new_tokens} new ones exceed the engine's KV length "
                            f"{self.max_past} (shapes.past); ask for fewer tokens or rebuild with a larger profile")
        if rows > self.max_batch:
            raise CapaError(f"batch {rows} exceeds the engine's profile maximum {self.max_batch} (shapes.batch)")
        if bool((mask[:, -1] == 0).any()):
            raise CapaError("attention_mask has padding at the end of a row (right padding): pad on the left")
        slots = self.visual_positions(batch)  # refuses rows with different candidate counts
        if self.queries == "text" and slots.shape[1] and int(slots.max()) >= length - 1:
            raise CapaError("the prompt has no text after the image to score visual tokens with")

    def check_images(self, batch: dict) -> None:
        """Images the engine cannot serve (videos, more images than its profile, sizes outside its
        pixel range), refused with one line before anything runs."""
        self.family.check_inputs(batch)
        images, most = self.family.image_count(batch), self.manifest["profile"]["shapes"]["images"][2]
        rows = int(torch.as_tensor(batch["input_ids"]).shape[0])
        if images != rows:  # the engine's graphs take one image per prompt
            raise CapaError(f"the input holds {images} images for {rows} prompt(s); this engine takes one image per "
                            f"prompt")
        if images > most:
            raise CapaError(f"the input holds {images} images but this engine takes at most {most} per batch "
                            f"(profile shapes.images); give one image per prompt, or rebuild with a larger images range")
        self.family.check_image_sizes(batch, self.manifest.get("vision_dims", {}))

    def generate_ids(self, batch: dict, max_new_tokens: int = 16, eos_token_id: int | None = None,
                     stream: Callable[[int], None] | None = None, forced_tokens=None):
        """Greedy generation from processor outputs (torch tensors or numpy arrays). Returns
        (tokens [B, T], keep_indices [B, k], timings) as numpy arrays and a dict of seconds.
        `stream` is called with each new token of row 0.

        forced_tokens [B, T]: teacher forcing (validation): each step is fed the given token, and the
        returned tokens are the engine's argmax predictions at each step."""
        batch = {k: torch.as_tensor(v) for k, v in batch.items()}
        input_ids = batch["input_ids"].to(torch.int64)
        rows, length = input_ids.shape
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(torch.int64)
        batch.update(input_ids=input_ids, attention_mask=mask)
        self.check_inputs(batch, max_new_tokens)
        self.check_images(batch)
        family = self.family
        timings = {}
        start = time.perf_counter()
        vision = self._run("vision", {k: batch[k] for k in family.vision_keys})
        features = family.pack_image_features(self._tensor("vision", vision["image_features"]), batch)
        timings["vision"] = time.perf_counter() - start
        start = time.perf_counter()
        embeds = self._tensor("embed", self._run("embed", {"input_ids": input_ids})["inputs_embeds"])
        embeds = family.merge_image_features(input_ids, embeds, features)
        positions = family.prefill_positions(batch)
        timings["embed"] = time.perf_counter() - start
        start = time.perf_counter()
        out = self._run("prefill", {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                    "visual_positions": self.visual_positions(batch)})
        token = self._tensor("prefill", out["logits"]).argmax(-1)[:, None].cpu()
        timings["prefill"] = time.perf_counter() - start
        timings["time_to_first_token"] = timings["vision"] + timings["embed"] + timings["prefill"]
        keep = self._tensor("prefill", out["keep_indices"]).cpu().clone()
        # the KV cache stays as the backend's handles; the small segment masks grow on the host
        cache = self.contract.cache_from_prefill(out)
        masks = {name: self._tensor("prefill", handle).cpu().clone() for name, handle in cache.items()
                 if name.startswith("past_segment_mask.")}
        cache.update(masks)
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
            new_embeds = self._tensor("embed", self._run("embed", {"input_ids": token})["inputs_embeds"])
            step = self._run("decode", {"inputs_embeds": new_embeds,
                                        "position_ids": family.decode_positions(next_position, 1), **cache})
            cache = self.contract.next_cache(cache, step, grow)
            next_position = next_position + 1
            token = self._tensor("decode", step["logits"])[:, -1].argmax(-1)[:, None].cpu()  # the step's one sync
            if eos_token_id is not None and forced_tokens is None:
                token[finished] = eos_token_id  # finished rows stay finished
            tokens.append(token)
            if stream:
                stream(int(token[0, 0]))
        steps = len(tokens) - 1
        timings["decode_total"] = time.perf_counter() - start
        timings["decode_per_token"] = timings["decode_total"] / steps if steps else 0.0
        return torch.cat(tokens, dim=1).numpy(), keep.numpy(), timings

    def generate_batch(self, images, questions, max_new_tokens: int = 32,
                       stream: Callable[[str], None] | None = None) -> list[Generation]:
        """Answers for several images and questions (one image each), run as one left-padded batch.
        `stream` receives row 0's text as it grows (decoded incrementally)."""
        inputs = self.prepare(images, questions)
        tokenizer = self.processor.tokenizer
        streamer = IncrementalText(tokenizer, stream) if stream else None
        tokens, keep, timings = self.generate_ids(inputs, max_new_tokens, tokenizer.eos_token_id,
                                                  streamer.add if streamer else None)
        if streamer:
            streamer.end()
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for row in range(tokens.shape[0]):
            answer = tokens[row].tolist()
            if tokenizer.eos_token_id in answer:  # a finished row is padded with end-of-sequence
                answer = answer[:answer.index(tokenizer.eos_token_id) + 1]
            results.append(Generation(tokenizer.decode(answer, skip_special_tokens=True), answer, keep[row].tolist(),
                                      int(prompt_tokens[row]), timings))
        return results

    def generate(self, image, question: str, max_new_tokens: int = 32,
                 stream: Callable[[str], None] | None = None) -> Generation:
        return self.generate_batch([image], [question], max_new_tokens, stream)[0]


class IncrementalText:
    """Streams text as tokens arrive, the way transformers' TextStreamer does: decode the growing
    sequence and emit the new suffix, holding it back while it ends in an incomplete character (a
    byte-fallback piece decodes to U+FFFD until its last byte arrives), so word boundaries that
    depend on neighbouring tokens (SentencePiece's leading spaces) come out right."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)
