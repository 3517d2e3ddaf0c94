"""TensorRT backend: a thin adapter over Polygraphy's TensorRT loaders.

    load_plugin_library()                            the CapaContribTopK plugin, before parsing or
                                                     deserialising: IPluginRegistry.load_library on the
                                                     library installed with capa-export (or one named
                                                     with --plugin-library), never one from an engine
                                                     folder, loaded from bytes checked against the
                                                     sha256 recorded at build time
    runner()                                         the plan's bytes read once and checked, deserialised
                                                     with engine_host_code_allowed off (unless the user
                                                     passes --allow-engine-code)
    NetworkFromOnnxPath(graph, strongly_typed=True)  TensorRT 11: precision comes from the ONNX dtypes
    CreateConfig(profiles, memory pool, timing cache, builder level, version compatibility)
    PostprocessConfig(...)                           plugins_to_serialize for version-compatible engines
    EngineFromNetwork(..., save_timing_cache)        -> <graph>.plan

`tensorrt` is imported only through Polygraphy's lazy loaders, inside these functions: the
package imports and everything else works without it. NOT EXERCISED in this repository's CI or on
its GPU machine (TensorRT cannot be installed there); see the README.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..artifacts import write_json
from ..config import keep_count
from ..contract import profile_ranges
from ..errors import CapaError
from ..folders import confined_file, read_json
from ..ops.spec import SPEC
from ..schemas import TENSORRT_ENGINE
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


def load_plugin_library(path: Path, sha256: str | None = None) -> str:
    """Register the plugin's creator once per process and return the sha256 of the library loaded.

    The library is loaded from bytes read once and checked against sha256 (the one the engine
    recorded at build time; None at build: the hash of what is read now), never reopened by path:
    the dynamic loader maps a sealed in-memory copy (folders.load_library_verified), and TensorRT's
    IPluginRegistry.load_library, given that copy's name, calls getCreators on the library already
    loaded. Loading it a second time would register the creator twice."""
    import tensorrt as trt

    from ..folders import load_library_verified, read_bytes

    if sha256 is None:
        sha256 = hashlib.sha256(read_bytes(path, max_bytes=1 << 30, name=f"plugin library {path}")).hexdigest()
    registry = trt.get_plugin_registry()
    if registry.get_creator(SPEC.name, SPEC.version, SPEC.namespace) is None:
        try:
            library = load_library_verified(path, sha256, name=f"plugin library {path}")
        except CapaError as exc:
            raise CapaError(f"{exc}; the engine was built with another plugin library: pass the one it was built "
                            f"with (--plugin-library), or rebuild the engine") from None
        if registry.load_library(library.path) is None:
            raise CapaError(f"TensorRT could not load the plugin library {path}")
    return sha256


def check_topk_limit(config, pruning: str, plugin_loaded: bool, max_visual: int | None = None) -> None:
    """TensorRT's TopK takes k <= 3840. The plugin has no such limit; the function body (imported
    when the plugin is not loaded) and the inlined lowering use TopK. A keep fraction is checked at
    the largest image's k (max_visual tokens) once that is known."""
    for _, keep in config.prune:
        if isinstance(keep, float):  # k = keep * N: the most the profile's largest image gives
            keep = max_visual and keep_count(keep, max_visual)
            if not keep:
                continue
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
    library = library_sha256 = None
    if profile.pruning == "function":
        library = plugin_library_or_none(plugin_library)
        if library is not None:
            library_sha256 = load_plugin_library(library)
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
                   "plugin": {"name": SPEC.name, "version": SPEC.version, "namespace": SPEC.namespace,
                              "library_sha256": library_sha256} if library is not None else None,
                   # a version-compatible plan carries the plugin library's code inside it
                   "embedded_plugins": bool(settings.get("version_compatible") and library is not None)}
    write_json(out_dir / ENGINE_FILE, description)
    return description


def check_folder(engine_dir: Path, files: dict | None = None) -> dict:
    """tensorrt.json of an engine's tensorrt/ folder, schema-checked (it names no library: the
    plugin library is never taken from an engine folder), with every file it names a regular file
    inside engine_dir (and, given the engine's file table relative to engine_dir, one it lists)."""
    name = f"{engine_dir}/{ENGINE_FILE}"
    description = read_json(confined_file(engine_dir, ENGINE_FILE, source=str(engine_dir)), schema=TENSORRT_ENGINE,
                            name=name)
    named = [(f"graphs.{graph}", file) for graph, file in description["graphs"].items()]
    if description.get("timing_cache"):
        named.append(("timing_cache", description["timing_cache"]))
    for key, file in named:
        if files is not None and file not in files:
            raise CapaError(f"{name}: {key} names {file!r}, which manifest.json does not list; rebuild the engine")
        confined_file(engine_dir, file, source=f"{name}: {key}")
    return description


def _deserialize(plan: bytes, allow_engine_code: bool, source: str):
    """An ICudaEngine from plan bytes. Polygraphy's EngineFromBytes always sets
    engine_host_code_allowed (so that version-compatible plans load): code carried inside a plan
    would run. Here it is allowed only on the user's explicit request."""
    import tensorrt as trt
    from polygraphy.backend.trt import util as trt_util

    runtime = trt.Runtime(trt_util.get_trt_logger())
    runtime.engine_host_code_allowed = bool(allow_engine_code)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise CapaError(f"TensorRT cannot deserialise {source} (built by another TensorRT version or for another "
                        f"GPU, or it carries code and --allow-engine-code was not given); rebuild the engine")
    return engine


def runner(engine_dir: Path, graph: str, *, spec=None, dtype: str = "fp32", files: dict | None = None,
           plugin_library: str | None = None, allow_engine_code: bool = False):
    """A Polygraphy runner for one graph of a built engine: the plan's bytes read once (checked
    against the engine's table when given), the installed plugin library (or the user's) checked
    against the sha256 recorded at build time, the plan's inputs and outputs against spec."""
    require()
    from polygraphy.backend.trt import TrtRunner

    from ..folders import read_bytes, read_verified_bytes
    from .base import check_graph_io

    description = check_folder(engine_dir, files)
    if description["embedded_plugins"] and not allow_engine_code:
        raise CapaError(f"{engine_dir}/{ENGINE_FILE}: the engine's plans carry plugin code (a version-compatible "
                        f"engine); run it only if you trust its builder, with --allow-engine-code")
    plugin = description["plugin"]
    if plugin is not None:
        load_plugin_library(find_plugin_library(plugin_library), plugin["library_sha256"])
    file = description["graphs"][graph]
    source = f"{engine_dir}/{file}"
    if files is not None:
        plan = read_verified_bytes(engine_dir / file, files[file]["sha256"], expected_bytes=files[file]["bytes"],
                                   max_bytes=16 << 30, name=source)
    else:
        plan = read_bytes(engine_dir / file, max_bytes=16 << 30, name=source)
    engine = _deserialize(plan, allow_engine_code, source)
    if spec is not None:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        check_graph_io(spec, {n: None for n in names if is_input[n]}, {n: None for n in names if not is_input[n]},
                       dtype, source)
    return TrtRunner(engine, name=f"tensorrt:{graph}")


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    auto_priority = 10  # preferred where installed

    def unavailable_reason(self):
        return unavailable_reason()

    def check(self, profile, config, *, plugin_library=None, max_visual=None) -> None:
        # before minutes of export, not after
        plugin = plugin_library_or_none(plugin_library) if profile.pruning == "function" else None
        check_topk_limit(config, profile.pruning, plugin is not None, max_visual)

    def build(self, onnx_dir, profile, out_dir, contract, *, fixed_dims, plugin_library=None) -> dict:
        return build(onnx_dir, profile, out_dir, contract, fixed_dims, plugin_library)

    def check_folder(self, backend_dir, files) -> dict:
        return check_folder(backend_dir, files)

    def runner(self, engine_dir, graph, *, spec=None, dtype="fp32", files=None, plugin_library=None,
               allow_engine_code=False):
        return runner(engine_dir, graph, spec=spec, dtype=dtype, files=files, plugin_library=plugin_library,
                      allow_engine_code=allow_engine_code)
