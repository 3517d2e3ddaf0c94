"""The graphs' input/output contract, written once.

A model family (`capa_export/models/`) instantiates it for a model (`ModelFamily.graph_contract`);
the exporter takes its names and dynamic dimensions from it, validation and the runtime build their
feeds with it, the TensorRT backend derives its shape ranges from it, and the engine manifest
records it, so an engine folder describes its own graphs. The split is the usual one of ONNX Runtime
GenAI and community LLaVA exports:

    vision   the family's pixel inputs                   -> image_features
    embed    input_ids [B, T]                            -> inputs_embeds [B, T, D]
    prefill  inputs_embeds, attention_mask, position_ids, visual_positions
                                                         -> logits [B, V] (last position), keep_indices [B, k],
                                                            segment_mask.{s}, present.{i}.key/value
    decode   inputs_embeds, position_ids, past_segment_mask.{s}, past.{i}.key/value
                                                         -> logits [B, T, V], present.{i}.key/value

A *segment* is a run of decoder layers that see the same sequence (before the first pruning layer,
then after each stage); each has its own padding mask and KV length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CapaError

GRAPHS = ("vision", "embed", "prefill", "decode")
FLOAT = "float"  # the graph's floating-point type (fp32 / fp16 / bf16, chosen at export)
FLOAT32 = "float32"  # fp32 whatever the graph's type (e.g. pixels as the processor makes them)
INT64 = "int64"
INT32 = "int32"


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: its export bounds and the build-profile range it follows
    (`profile`: a key of BuildProfile.shapes, "tokens" for prompt-or-step lengths, "step" for a
    single decode step, or None for a value fixed per model, given at build time)."""

    name: str
    min: int
    max: int
    profile: str | None


BATCH = Dim("batch", 1, 256, "batch")
IMAGES = Dim("images", 1, 64, "images")
SEQUENCE = Dim("sequence", 8, 16384, "sequence")
TOKENS = Dim("tokens", 1, 16384, "tokens")  # embed serves prompts and single decode tokens
VISUAL = Dim("visual_tokens", 1, 16384, None)
#: flattened image patches of dynamic-resolution vision towers (Qwen-VL), all images together;
#: its range follows the profile's image pixel range (given at build time, like visual_tokens)
PATCHES = Dim("patches", 4, 65536, None)
NEW_TOKENS = Dim("new_tokens", 1, 4096, "step")


def past_dim(segment: int) -> Dim:
    return Dim(f"past_segment{segment}", 1, 16384, "past")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # FLOAT, FLOAT32, INT64 or INT32
    shape: tuple  # ints and Dims

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype,
                "shape": [d.name if isinstance(d, Dim) else d for d in self.shape]}


@dataclass(frozen=True)
class GraphSpec:
    """One graph. `arguments` groups the inputs the way the graph module's forward takes them: a
    name, or a tuple of names passed as one list (the decoder's many KV tensors)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    arguments: tuple = ()

    def __post_init__(self):
        if not self.arguments:
            object.__setattr__(self, "arguments", tuple(t.name for t in self.inputs))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def forward_arguments(self, values: dict) -> tuple:
        """The graph module's forward arguments from tensors keyed by input name."""
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise CapaError(f"{self.name} graph: inputs {', '.join(missing[:4])} were not given")
        return tuple([values[n] for n in group] if isinstance(group, tuple) else values[group]
                     for group in self.arguments)

    def dynamic_shapes(self) -> tuple:
        """torch.export dynamic shapes, mirroring forward_arguments (one Dim object per name)."""
        import torch

        made: dict[str, object] = {}

        def axes(spec: TensorSpec) -> dict:
            return {axis: made.setdefault(d.name, torch.export.Dim(d.name, min=d.min, max=d.max))
                    for axis, d in enumerate(spec.shape) if isinstance(d, Dim)}

        return tuple([axes(self.input(n)) for n in group] if isinstance(group, tuple) else axes(self.input(group))
                     for group in self.arguments)

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


@dataclass
class GraphContract:
    graphs: dict[str, GraphSpec]
    layer_segment: list[int] = field(default_factory=list)  # segment of each decoder layer

    def __getitem__(self, graph: str) -> GraphSpec:
        return self.graphs[graph]

    @property
    def num_layers(self) -> int:
        return len(self.layer_segment)

    @property
    def num_segments(self) -> int:
        return max(self.layer_segment, default=0) + 1

    def to_dict(self) -> dict:
        return {"layer_segment": list(self.layer_segment), "graphs": {g: s.to_dict() for g, s in self.graphs.items()}}

    # --- the decoder's state between graphs -------------------------------------------------
    def cache_from_prefill(self, outputs: dict) -> dict:
        """The decode graph's past inputs from the prefill (or a previous decode) outputs."""
        past = {f"past.{i}.{kv}": outputs[f"present.{i}.{kv}"] for i in range(self.num_layers) for kv in ("key", "value")}
        if "segment_mask.0" in outputs:
            past.update({f"past_segment_mask.{s}": outputs[f"segment_mask.{s}"] for s in range(self.num_segments)})
        return past

    def next_cache(self, cache: dict, decode_outputs: dict, grow_masks) -> dict:
        """The cache after a decode step: its present KV, and each segment mask grown by
        `grow_masks(mask)` (the new tokens are real tokens)."""
        updated = {f"past.{i}.{kv}": decode_outputs[f"present.{i}.{kv}"]
                   for i in range(self.num_layers) for kv in ("key", "value")}
        updated.update({f"past_segment_mask.{s}": grow_masks(cache[f"past_segment_mask.{s}"])
                        for s in range(self.num_segments)})
        return updated


def to_feed_array(tensor: TensorSpec, value, graph_dtype: str):
    """A host tensor (torch or numpy) as the numpy array the graph input `tensor` takes, in a graph
    exported in `graph_dtype` (fp32, fp16; bf16 inputs, which numpy lacks, go as fp32 to a runner
    that casts them)."""
    import numpy as np
    import torch

    from .dtypes import float_type

    value = torch.as_tensor(value).detach().cpu()
    if tensor.dtype == FLOAT:
        return value.float().numpy().astype(float_type(graph_dtype).numpy or np.float32)
    if tensor.dtype == FLOAT32:
        return value.float().numpy()
    return value.numpy().astype(np.int64 if tensor.dtype == INT64 else np.int32)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def decoder_contract(*, layer_segment: list[int], hidden: int, vocab: int, kv_heads: int, head_dim: int,
                     vision_inputs: tuple[TensorSpec, ...], image_features: TensorSpec,
                     position_rows: tuple[int, ...] = (), keep: int | None = None) -> GraphContract:
    """The four graphs of a decoder-only LVLM. A family gives its vision inputs and feature shape,
    and `position_rows` when its rotary positions have leading rows (M-RoPE: (3,))."""
    num_layers = len(layer_segment)
    segments = max(layer_segment, default=0) + 1
    past = [past_dim(s) for s in range(segments)]
    positions = lambda length: TensorSpec("position_ids", INT64, (*position_rows, BATCH, length))  # noqa: E731

    def kv(prefix: str, length_of_segment) -> list[TensorSpec]:
        return [TensorSpec(f"{prefix}.{i}.{t}", FLOAT, (BATCH, kv_heads, length_of_segment(layer_segment[i]), head_dim))
                for i in range(num_layers) for t in ("key", "value")]

    segment_length = lambda s: f"segment{s}"  # noqa: E731  (outputs: data-dependent lengths, named only)
    masks_out = [TensorSpec(f"segment_mask.{s}", INT64, (BATCH, segment_length(s))) for s in range(segments)]
    masks_in = [TensorSpec(f"past_segment_mask.{s}", INT64, (BATCH, past[s])) for s in range(segments)]
    decode_kv_in = kv("past", lambda s: past[s])
    graphs = {
        "vision": GraphSpec("vision", vision_inputs, (image_features,),
                            arguments=(tuple(t.name for t in vision_inputs),)),
        "embed": GraphSpec("embed", (TensorSpec("input_ids", INT64, (BATCH, TOKENS)),),
                           (TensorSpec("inputs_embeds", FLOAT, (BATCH, TOKENS, hidden)),)),
        "prefill": GraphSpec(
            "prefill",
            (TensorSpec("inputs_embeds", FLOAT, (BATCH, SEQUENCE, hidden)),
             TensorSpec("attention_mask", INT64, (BATCH, SEQUENCE)),
             positions(SEQUENCE),
             TensorSpec("visual_positions", INT64, (BATCH, VISUAL))),
            (TensorSpec("logits", FLOAT, (BATCH, vocab)),
             TensorSpec("keep_indices", INT64, (BATCH, keep if keep is not None else VISUAL)),
             *masks_out, *kv("present", segment_length))),
        "decode": GraphSpec(
            "decode",
            (TensorSpec("inputs_embeds", FLOAT, (BATCH, NEW_TOKENS, hidden)), positions(NEW_TOKENS),
             *masks_in, *decode_kv_in),
            (TensorSpec("logits", FLOAT, (BATCH, NEW_TOKENS, vocab)),
             *kv("present", lambda s: f"segment{s}+new_tokens")),
            arguments=("inputs_embeds", "position_ids", tuple(t.name for t in masks_in),
                       tuple(t.name for t in decode_kv_in))),
    }
    return GraphContract(graphs, list(layer_segment))


def profile_ranges(spec: GraphSpec, shapes: dict, fixed: dict[str, int]) -> dict[str, tuple]:
    """(min, opt, max) shapes of every input of `spec` from a build profile's `shapes` table
    ({"batch": (lo, opt, hi), "sequence": ..., "past": ..., "images": ...}); `fixed` gives the
    dimensions the model family derives (ModelFamily.dim_ranges: e.g. visual_tokens, patches), as a
    value or a (min, opt, max) range."""
    ranges = {}
    for tensor in spec.inputs:
        lo, opt, hi = [], [], []
        for dim in tensor.shape:
            if isinstance(dim, int):
                triple = (dim, dim, dim)
            elif dim.name in fixed:
                value = fixed[dim.name]
                triple = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
            elif dim.profile == "step":
                triple = (1, 1, 1)
            elif dim.profile == "tokens":
                triple = (1, shapes["sequence"][1], shapes["sequence"][2])
            elif dim.profile in shapes:
                triple = tuple(shapes[dim.profile])
            else:
                raise CapaError(f"graph input {tensor.name} has a dimension {dim.name!r} that the build profile "
                                f"does not cover")
            lo.append(triple[0]), opt.append(triple[1]), hi.append(triple[2])
        ranges[tensor.name] = (tuple(lo), tuple(opt), tuple(hi))
    return ranges
