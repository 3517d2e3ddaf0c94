"""Build profiles (`capa_export/build_profiles/*.toml`, or any TOML file): what an engine is built for.

    name, description
    backend      a backend name (capa_export/backends) | "auto" (TensorRT where installed, else ONNX Runtime)
    precision    "fp32" | "fp16" | "bf16": the dtype the ONNX graphs are exported in (TensorRT 11
                 networks are strongly typed: the graph carries the precision, no builder flag)
    pruning      "function" (one CapaContribTopK node with its ONNX local function: the TensorRT plugin
                 where loaded, the standard-op body elsewhere) | "inline" (the body inlined: standard
                 ops only); "plugin" / "onnx" are accepted as their earlier names
    attention    "fused" (each layer's attention as one ONNX Attention op, opset 23) | "explicit"
                 (MatMul / Softmax / MatMul, for runtimes without Attention-23)
    attention_blocks  fused attention of the layers that attend from every row of the prompt
                 (those before the scoring layer) as this many Attention ops over blocks of query
                 rows, each with the keys up to its last row: the same result with about
                 (n + 1) / 2n of the L x L work, for kernels that compute masked products (ONNX
                 Runtime's CPU Attention); default 1
    prune        optional [[K, k], ...] overriding the calibrated schedule (k is fixed per engine)
    providers    ONNX Runtime execution providers, in order
    workspace_mib              TensorRT memory-pool limit / ONNX Runtime arena cap
    optimization_level         ONNX Runtime: "disable" | "basic" | "extended" | "all"
    [shapes]     min / opt / max of: batch, sequence (prompt tokens incl. visual), past (KV length),
                 images (per batch), and optionally pixels (the area of an image after the
                 processor's resize, for dynamic-resolution families: it sets the patches and
                 visual tokens per image; default: the processor's own range) -- the TensorRT
                 optimisation profile, and the limits the runtime enforces
    [tensorrt]   timing_cache (file name, reused across builds), version_compatible (bool),
                 builder_optimization_level (0-5)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import backends
from .dtypes import NAMES as PRECISIONS
from .errors import CapaError

#: Named profiles ship with the package; any other profile is given as a TOML file.
PROFILE_DIRS = (Path(__file__).resolve().parent / "build_profiles",)
SHAPE_NAMES = ("batch", "sequence", "past", "images", "pixels")
#: shapes every profile has (pixels matters only to dynamic-resolution families: no default)
REQUIRED_SHAPES = ("batch", "sequence", "past", "images")
ORT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class BuildProfile:
    name: str
    precision: str = "fp32"
    backend: str = "auto"
    pruning: str = "function"
    attention: str = "fused"
    attention_blocks: int = 1
    prune: list[tuple[int, int]] | None = None
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    workspace_mib: int = 1024
    optimization_level: str = "all"
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    tensorrt: dict = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def __post_init__(self):
        where = f"profile {self.source or self.name}"
        known = ("auto", *backends.names())
        if self.backend not in known:
            raise CapaError(f"{where}: backend {self.backend!r} must be one of {', '.join(known)}")
        if self.precision not in PRECISIONS:
            raise CapaError(f"{where}: precision {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        from .export.graphs import LOWERING_ALIASES, PRUNING_LOWERINGS

        from .export.exporter import ATTENTION_FORMS, check_attention_blocks

        if self.attention not in ATTENTION_FORMS:
            raise CapaError(f"{where}: attention {self.attention!r} must be one of {', '.join(ATTENTION_FORMS)}")
        check_attention_blocks(self.attention_blocks, self.attention, f"{where}: attention_blocks")
        self.pruning = LOWERING_ALIASES.get(self.pruning, self.pruning)
        if self.pruning not in PRUNING_LOWERINGS:
            raise CapaError(f"{where}: pruning {self.pruning!r} must be one of {', '.join(PRUNING_LOWERINGS)}")
        if self.optimization_level not in ORT_LEVELS:
            raise CapaError(f"{where}: optimization_level {self.optimization_level!r} must be one of "
                            f"{', '.join(ORT_LEVELS)}")
        if not isinstance(self.workspace_mib, int) or self.workspace_mib <= 0:
            raise CapaError(f"{where}: workspace_mib {self.workspace_mib} must be positive")
        shapes = {}
        for key, value in self.shapes.items():
            if key not in SHAPE_NAMES:
                raise CapaError(f"{where}: shapes.{key} is unknown; expected {', '.join(SHAPE_NAMES)}")
            try:
                lo, opt, hi = (int(v) for v in value)
            except (TypeError, ValueError):
                raise CapaError(f"{where}: shapes.{key} = {value!r} must be [min, opt, max]") from None
            if not 1 <= lo <= opt <= hi:
                raise CapaError(f"{where}: shapes.{key} = [{lo}, {opt}, {hi}] must satisfy 1 <= min <= opt <= max")
            shapes[key] = (lo, opt, hi)
        for key in REQUIRED_SHAPES:
            shapes.setdefault(key, (1, 1, 1) if key in ("batch", "images") else (1, 1024, 4096))
        self.shapes = shapes
        if self.attention_blocks > shapes["sequence"][0]:  # a block per row at least: no empty Attention
            raise CapaError(f"{where}: attention_blocks = {self.attention_blocks} exceeds the shortest prompt "
                            f"shapes.sequence[0] = {shapes['sequence'][0]}; use at most that many blocks")
        if self.prune is not None:
            from .config import CapaConfig

            self.prune = CapaConfig(prune=self.prune).prune  # same validation as the config's

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "BuildProfile":
        try:
            if not isinstance(data.get("shapes", {}), dict) or not isinstance(data.get("tensorrt", {}), dict):
                raise TypeError("[shapes] and [tensorrt] must be tables")
            if not isinstance(data.get("providers", []), list):
                raise TypeError("providers must be a list of names")
            return cls(**data, source=source)
        except (TypeError, ValueError) as exc:
            raise CapaError(f"build profile {source}: {exc}") from None

    @classmethod
    def load(cls, name_or_path: str) -> "BuildProfile":
        path = Path(name_or_path)
        if not path.suffix:
            found = [d / f"{name_or_path}.toml" for d in PROFILE_DIRS if (d / f"{name_or_path}.toml").is_file()]
            path = found[0] if found else Path(f"{name_or_path}.toml")
        if not path.is_file():
            available = ", ".join(sorted({p.stem for d in PROFILE_DIRS for p in d.glob("*.toml")}))
            raise CapaError(f"build profile {name_or_path!r} not found; give a TOML file or one of: {available}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CapaError(f"build profile {path} is not valid TOML ({exc})") from None
        known = set(cls.__dataclass_fields__) - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CapaError(f"build profile {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data.setdefault("name", path.stem)
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "precision": self.precision,
                "backend": self.backend, "pruning": self.pruning, "attention": self.attention,
                "attention_blocks": self.attention_blocks,
                "prune": [list(s) for s in self.prune] if self.prune else None, "providers": self.providers,
                "workspace_mib": self.workspace_mib, "optimization_level": self.optimization_level,
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "tensorrt": self.tensorrt}
