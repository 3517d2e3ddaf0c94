"""TensorRT backend: a thin adapter over Polygraphy's TensorRT loaders.

    LoadPlugins(libcapa_contrib_topk_plugin.so)      the CapaContribTopK plugin, before parsing
    NetworkFromOnnxPath(graph, strongly_typed=True)  TensorRT 11: precision comes from the ONNX dtypes
    CreateConfig(profiles, memory pool, timing cache, builder level, version compatibility)
    PostprocessConfig(...)                           plugins_to_serialize for version-compatible engines
    EngineFromNetwork(..., save_timing_cache)        -> <graph>.plan

`tensorrt` is imported only through Polygraphy's lazy loaders, inside these functions: the
package imports and everything else works without it. NOT EXERCISED in this repository's CI or on
its GPU machine (TensorRT cannot be installed there); see the README.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from ..artifacts import write_json
from ..contract import profile_ranges
from ..errors import CapaError
from .base import Backend, register_backend

PLAN_SUFFIX = ".plan"
ENGINE_FILE = "tensorrt.json"
PLUGIN_LIBRARY = "libcapa_contrib_topk_plugin.so"
#: TensorRT's TopK accepts k <= 3840 (the standard-op lowering uses TopK)
TOPK_MAX = 3840


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed (pip install tensorrt from NVIDIA's package index, TensorRT >= 10.8 "
                "for IPluginV3); use --backend onnxruntime")
    return None


def require() -> None:
    reason = unavailable_reason()
    if reason:
        raise CapaError(reason)


def find_plugin_library(explicit: str | None = None) -> Path:
    """The plugin library: an explicit path, $CAPA_TRT_PLUGIN, or the CMake build tree."""
    import os

    candidates = [explicit] if explicit else [os.environ.get("CAPA_TRT_PLUGIN")]
    candidates += [str(p) for p in Path(__file__).resolve().parents[2].glob(f"build/**/{PLUGIN_LIBRARY}")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if explicit:
        raise CapaError(f"plugin library {explicit} does not exist; build it with cmake -DTensorRT_ROOT=... "
                        f"(target capa_contrib_topk_plugin)")
    raise CapaError(f"{PLUGIN_LIBRARY} not found: build it with cmake -DTensorRT_ROOT=<TensorRT> (target "
                    f"capa_contrib_topk_plugin), or pass --plugin-library / set CAPA_TRT_PLUGIN")


def check_topk_limit(config, pruning: str) -> None:
    """The standard-op lowering cannot keep more than TopK's limit (the plugin has no such limit)."""
    if pruning == "onnx":
        for _, keep in config.prune:
            if keep > TOPK_MAX:
                raise CapaError(f"k={keep} exceeds TensorRT's TopK limit of {TOPK_MAX} for --pruning onnx; "
                                f"use the plugin lowering or a smaller k")


def build(onnx_dir: Path, profile, out_dir: Path, contract, fixed_dims: dict, plugin_library: str | None = None) -> dict:
    require()
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, LoadPlugins, NetworkFromOnnxPath,
                                        PostprocessConfig, Profile, SaveEngine)
    import tensorrt as trt

    out_dir.mkdir(parents=True, exist_ok=True)
    library = None
    if profile.pruning == "plugin":
        # the engine folder carries its plugin: it loads on another host, and is checksummed
        library = out_dir / PLUGIN_LIBRARY
        shutil.copy2(find_plugin_library(plugin_library), library)
    settings = profile.tensorrt
    cache = out_dir / settings.get("timing_cache", "timing.cache")
    plans = {}
    for graph, spec in contract.graphs.items():
        shapes = Profile()
        for name, (lo, opt, hi) in profile_ranges(spec, profile.shapes, fixed_dims).items():
            shapes.add(name, min=lo, opt=opt, max=hi)
        network = NetworkFromOnnxPath(str(onnx_dir / f"{graph}.onnx"), strongly_typed=True)
        if library is not None:
            network = LoadPlugins(plugins=[str(library)], obj=network)
        config = CreateConfig(
            profiles=[shapes],
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(profile.workspace_mib) << 20},
            load_timing_cache=str(cache) if cache.exists() else None,
            builder_optimization_level=settings.get("builder_optimization_level"),
            version_compatible=settings.get("version_compatible", False),
        )
        if settings.get("version_compatible") and library is not None:
            # a version-compatible engine embeds only the plugin libraries listed here
            def serialize_plugin(builder, network, cfg, library=str(library)):
                cfg.plugins_to_serialize = [library]  # a property in TensorRT's Python API

            config = PostprocessConfig(config, serialize_plugin)
        engine = EngineFromNetwork(network, config, save_timing_cache=str(cache))
        plan = out_dir / f"{graph}{PLAN_SUFFIX}"
        SaveEngine(engine, str(plan))()
        plans[graph] = plan.name
    description = {"backend": TensorRTBackend.name, "tensorrt": trt.__version__, "graphs": plans, "timing_cache": cache.name,
                   "plugin_library": library.name if library is not None else None}
    write_json(out_dir / ENGINE_FILE, description)
    return description


def runner(engine_dir: Path, graph: str):
    require()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, LoadPlugins, TrtRunner

    description = json.loads((engine_dir / ENGINE_FILE).read_text())
    plan = BytesFromPath(str(engine_dir / description["graphs"][graph]))
    if description.get("plugin_library"):
        plan = LoadPlugins(plugins=[str(engine_dir / description["plugin_library"])], obj=plan)
    engine = EngineFromBytes(plan)
    return TrtRunner(engine, name=f"tensorrt:{graph}")


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    auto_priority = 10  # preferred where installed

    def unavailable_reason(self):
        return unavailable_reason()

    def check(self, profile, config, *, plugin_library=None) -> None:
        check_topk_limit(config, profile.pruning)
        if profile.pruning == "plugin":
            find_plugin_library(plugin_library)  # before minutes of export, not after

    def build(self, onnx_dir, profile, out_dir, contract, *, fixed_dims, plugin_library=None) -> dict:
        return build(onnx_dir, profile, out_dir, contract, fixed_dims, plugin_library)

    def runner(self, engine_dir, graph):
        return runner(engine_dir, graph)
