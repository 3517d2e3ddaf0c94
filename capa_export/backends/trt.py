"""TensorRT backend: a thin adapter over Polygraphy's TensorRT loaders.

    load_plugin_library()                            the CapaContribTopK plugin, before parsing or
                                                     deserialising: IPluginRegistry.load_library on the
                                                     library installed with capa-export (or one named
                                                     with --plugin-library), never one from an engine folder
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
from pathlib import Path

from ..artifacts import write_json
from ..contract import profile_ranges
from ..errors import CapaError
from ..ops.spec import SPEC
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
    """The plugin library (the one exporting getCreators, see plugins/contrib_topk/README.md): an
    explicit path, $CAPA_TRT_PLUGIN, the copy installed with the package, or the CMake build tree."""
    import os

    candidates = [explicit] if explicit else [os.environ.get("CAPA_TRT_PLUGIN")]
    package = Path(__file__).resolve().parents[1]
    candidates += [str(package / PLUGIN_LIBRARY)]
    candidates += [str(p) for p in package.parent.glob(f"build/**/{PLUGIN_LIBRARY}")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if explicit:
        raise CapaError(f"plugin library {explicit} does not exist; build it with cmake -DTensorRT_ROOT=... "
                        f"(target capa_contrib_topk_plugin)")
    raise CapaError(f"{PLUGIN_LIBRARY} not found: build it with cmake -DTensorRT_ROOT=<TensorRT> (target "
                    f"capa_contrib_topk_plugin), or pass --plugin-library / set CAPA_TRT_PLUGIN")


def load_plugin_library(path: Path) -> None:
    """Register the plugin's creator once per process (IPluginRegistry.load_library, which calls
    the library's getCreators; loading it a second time would register it twice)."""
    import tensorrt as trt

    registry = trt.get_plugin_registry()
    if registry.get_creator(SPEC.name, SPEC.version, SPEC.namespace) is None:
        if registry.load_library(str(path)) is None:
            raise CapaError(f"TensorRT could not load the plugin library {path}")


def check_topk_limit(config, pruning: str, plugin_loaded: bool) -> None:
    """TensorRT's TopK takes k <= 3840. The plugin has no such limit; the function body (imported
    when the plugin is not loaded) and the inlined lowering use TopK."""
    for _, keep in config.prune:
        if keep <= TOPK_MAX:
            continue
        if pruning == "inline":
            raise CapaError(f"k={keep} exceeds TensorRT's TopK limit of {TOPK_MAX}, which --pruning inline uses; "
                            f"use --pruning function with the plugin library, or keep at most {TOPK_MAX} tokens")
        if not plugin_loaded:
            raise CapaError(f"k={keep} exceeds TensorRT's TopK limit of {TOPK_MAX}, which the CapaContribTopK "
                            f"function body uses when the plugin is not loaded; build {PLUGIN_LIBRARY} "
                            f"(target capa_contrib_topk_plugin) or pass --plugin-library, or keep at most "
                            f"{TOPK_MAX} tokens")


def plugin_library_or_none(explicit: str | None) -> Path | None:
    """The plugin library when one is found (an explicit path must exist), else None: TensorRT then
    imports the CapaContribTopK function's body."""
    try:
        return find_plugin_library(explicit)
    except CapaError:
        if explicit:
            raise
        return None


def build(onnx_dir: Path, profile, out_dir: Path, contract, fixed_dims: dict, plugin_library: str | None = None) -> dict:
    require()
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessConfig,
                                        Profile, SaveEngine)
    import tensorrt as trt

    out_dir.mkdir(parents=True, exist_ok=True)
    library = plugin_library_or_none(plugin_library) if profile.pruning == "function" else None
    if library is not None:
        load_plugin_library(library)
    settings = profile.tensorrt
    cache = out_dir / settings.get("timing_cache", "timing.cache")
    plans = {}
    for graph, spec in contract.graphs.items():
        shapes = Profile()
        for name, (lo, opt, hi) in profile_ranges(spec, profile.shapes, fixed_dims).items():
            shapes.add(name, min=lo, opt=opt, max=hi)
        network = NetworkFromOnnxPath(str(onnx_dir / f"{graph}.onnx"), strongly_typed=True)
        config = CreateConfig(
            profiles=[shapes],
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(profile.workspace_mib) << 20},
            load_timing_cache=str(cache) if cache.exists() else None,
            builder_optimization_level=settings.get("builder_optimization_level"),
            version_compatible=settings.get("version_compatible", False),
        )
        if settings.get("version_compatible") and library is not None:
            # a version-compatible engine embeds only the plugin libraries listed here (the
            # getCreators library: the lean runtime loads it as IPluginRegistry.loadLibrary does)
            def serialize_plugin(builder, network, cfg, library=str(library)):
                cfg.plugins_to_serialize = [library]  # a property in TensorRT's Python API

            config = PostprocessConfig(config, serialize_plugin)
        engine = EngineFromNetwork(network, config, save_timing_cache=str(cache))
        plan = out_dir / f"{graph}{PLAN_SUFFIX}"
        SaveEngine(engine, str(plan))()
        plans[graph] = plan.name
    description = {"backend": TensorRTBackend.name, "tensorrt": trt.__version__, "graphs": plans, "timing_cache": cache.name,
                   "plugin": {"name": SPEC.name, "version": SPEC.version, "namespace": SPEC.namespace}
                   if library is not None else None}
    write_json(out_dir / ENGINE_FILE, description)
    return description


def runner(engine_dir: Path, graph: str, plugin_library: str | None = None):
    require()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    description = json.loads((engine_dir / ENGINE_FILE).read_text())
    if description.get("plugin"):
        load_plugin_library(find_plugin_library(plugin_library))
    engine = EngineFromBytes(BytesFromPath(str(engine_dir / description["graphs"][graph])))
    return TrtRunner(engine, name=f"tensorrt:{graph}")


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    auto_priority = 10  # preferred where installed

    def unavailable_reason(self):
        return unavailable_reason()

    def check(self, profile, config, *, plugin_library=None) -> None:
        # before minutes of export, not after
        plugin = plugin_library_or_none(plugin_library) if profile.pruning == "function" else None
        check_topk_limit(config, profile.pruning, plugin is not None)

    def build(self, onnx_dir, profile, out_dir, contract, *, fixed_dims, plugin_library=None) -> dict:
        return build(onnx_dir, profile, out_dir, contract, fixed_dims, plugin_library)

    def runner(self, engine_dir, graph):
        return runner(engine_dir, graph)
