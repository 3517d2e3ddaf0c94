"""`capa-export build`: model -> CAPA (calibrating if needed) -> ONNX -> engine -> validation.

The engine directory is assembled under a temporary name next to its destination and renamed
only at the end. It is marked complete (manifest.json "complete": true) only when validation
passed; a build whose validation fails is kept as `<name>.failed/` for inspection, and an
interrupted one leaves only the hidden temporary folder, never a directory that looks complete.

    <engine>/manifest.json      what, from what, settings, versions, checksums, validation summary
             validation.json    Polygraphy comparisons per graph and output, token agreement
             capa/              capa_config.json, ffn_approx.safetensors/.json
             processor/         tokenizer + image processor (save_pretrained)
             onnx/              vision/embed/prefill/decode.onnx, weights.data, export.json
             onnxruntime/       *.opt.onnx (+ .opt.data), session.json    | tensorrt/ *.plan, timing.cache
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import backends
from .artifacts import check_replaceable, make_work_dir, write_json
from .capa.calibration import builtin_samples, encode
from .capa.ffn import META_FILE, FfnApproximation, fit_ffn_approximation
from .capa.model import apply_capa
from .config import CapaConfig
from .errors import CapaError
from .export.exporter import GRAPHS, export_model, graph_io_names
from .manifest import read_manifest, write_manifest
from .models import adapter_for, load_model
from .profiles import TENSORRT_TOPK_MAX, BuildProfile

DEFAULT_ROOT = Path("engines") / "build"


def calibrated_config(model, processor, capa_dir: str | None, calibration_samples=None, progress=True):
    """(CapaConfig, FfnApproximation | None): from a `calibrate` folder, or calibrated now."""
    if capa_dir:
        config = CapaConfig.load(capa_dir)
        approx = FfnApproximation.load(capa_dir, model) if (Path(capa_dir) / META_FILE).exists() else None
        return config, approx
    adapter = adapter_for(model)
    config = CapaConfig(ffn_layers="auto")
    samples = calibration_samples or builtin_samples(8)
    inputs = [encode(adapter, processor, s) for s in samples]
    lo, hi = config.resolved_ffn_range(adapter.num_layers)
    approx = fit_ffn_approximation(model, inputs, "auto", ridge=config.ffn_ridge, threshold=config.ffn_threshold,
                                   layer_range=(lo, hi), progress=progress)
    config.ffn_layers = list(approx.selected_layers)
    return config, approx


def check_engine_dtype(dtype: str) -> None:
    if dtype == "bf16":
        raise CapaError("bf16 engines are not supported yet: the runtime and the validation pass tensors as numpy "
                        "arrays, which have no bfloat16; build with the edge profile (fp16), or export bf16 ONNX "
                        "for your own runtime with `capa-export export --dtype bf16`")


def check_topk_limit(config: CapaConfig, backend: str, pruning: str) -> None:
    """TensorRT's TopK takes k <= 3840: the standard-op lowering cannot keep more there."""
    if backend == "tensorrt" and pruning == "onnx":
        for _, keep in config.prune:
            if keep > TENSORRT_TOPK_MAX:
                raise CapaError(f"k={keep} exceeds TensorRT's TopK limit of {TENSORRT_TOPK_MAX} for --pruning onnx; "
                                f"use the plugin lowering or a smaller k")


def validation_inputs(adapter, processor, samples=None) -> list[dict]:
    samples = samples or builtin_samples(1, seed=7)
    return [encode(adapter, processor, s) for s in samples]


def validate_engine(engine_dir: Path, model, processor, samples=None, max_new_tokens: int = 8,
                    write: bool = True) -> dict:
    """Validate an engine directory against the CapaModel (fp32) rebuilt from its own capa/ folder.
    Writes validation.json and rewrites manifest.json with complete = passed."""
    from .runtime import CapaEngine
    from .validate import TOLERANCES, compare_graphs, format_report, token_agreement

    manifest = read_manifest(engine_dir, verify=True, require_complete=False)
    dtype = manifest["dtype"]
    check_engine_dtype(dtype)
    config, approx = calibrated_config(model, processor, str(engine_dir / "capa"))
    capa = apply_capa(model, config, approx)
    unpruned = apply_capa(model, CapaConfig(prune=[]))
    adapter = adapter_for(model)
    batches = validation_inputs(adapter, processor, samples)
    backend = backends.BACKENDS[manifest["backend"]]
    runners = {g: backend.runner(engine_dir / manifest["backend_dir"], g) for g in GRAPHS}
    names = {g: outs for g, (_, outs) in graph_io_names(adapter.num_layers, max(manifest["layer_segment"]) + 1).items()}
    graphs = compare_graphs(runners, capa, batches, dtype, names)
    del runners  # one set of sessions at a time (the engine below opens its own)
    with CapaEngine(engine_dir, verify=False, require_complete=False) as engine:
        end_to_end = [token_agreement(engine, capa, unpruned, b, max_new_tokens) for b in batches]
    # fp32: free-running greedy tokens must all agree. Reduced precision may flip a near-tie and
    # then drift, so it is held to the teacher-forced agreement: at each step, fed the reference's
    # tokens, the engine's argmax must match the reference's next token.
    measure, required = ("agreement", 1.0) if dtype == "fp32" else ("forced_agreement", 0.9)
    passed = all(g["passed"] for g in graphs.values()) and all(e[measure] >= required for e in end_to_end)
    report = {"passed": passed, "dtype": dtype, "backend": manifest["backend"], "tolerances": TOLERANCES[dtype],
              "required_agreement": required, "agreement_measure": measure, "max_new_tokens": max_new_tokens, "graphs": graphs,
              "end_to_end": end_to_end, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if write:
        write_json(engine_dir / "validation.json", report)
        fields = {k: v for k, v in manifest.items() if k not in ("format_version", "tool", "complete", "files")}
        fields["validation"] = {"passed": passed, "agreement": [e["agreement"] for e in end_to_end],
                                "graphs": {g: r["passed"] for g, r in graphs.items()}}
        write_manifest(engine_dir, fields, complete=passed)
    report["table"] = format_report(report)
    return report


def build_engine(model_name: str, profile_name: str, out: str | Path | None = None, capa_dir: str | None = None,
                 backend: str | None = None, pruning: str | None = None, plugin_library: str | None = None,
                 calibration_samples=None, validation_samples=None, max_new_tokens: int = 8,
                 progress: bool = True, log=print) -> tuple[Path, dict]:
    profile = BuildProfile.load(profile_name)
    if pruning:
        profile.pruning = pruning
    check_engine_dtype(profile.precision)
    backend_name = backends.resolve(backend or profile.backend)
    name = f"{Path(model_name).name}-{profile.name}"
    final = Path(out) if out else DEFAULT_ROOT / name
    check_replaceable(final)
    check_replaceable(final.with_name(final.name + ".failed"))
    if plugin_library is not None and not Path(plugin_library).is_file():
        raise CapaError(f"plugin library {plugin_library} does not exist; build it with cmake (target "
                        f"capa_contrib_topk_plugin) or leave --plugin-library out")
    if backend_name == "tensorrt" and profile.pruning == "plugin":
        backends.trt.find_plugin_library(plugin_library)  # before minutes of export, not after

    start = time.perf_counter()
    model, processor = load_model(model_name, "fp32")
    adapter = adapter_for(model)
    if profile.prune is not None:  # a bad override is refused before the minutes of calibration
        override = CapaConfig(prune=profile.prune)
        override.check_for_model(adapter.num_layers)
        override.check_for_visual_tokens(adapter.num_visual_tokens_per_image())
        check_topk_limit(override, backend_name, profile.pruning)
    log(f"[1/4] CAPA config for {model_name} ({'from ' + capa_dir if capa_dir else 'calibrating on built-in inputs'})")
    config, approx = calibrated_config(model, processor, capa_dir, calibration_samples, progress)
    if profile.prune is not None:
        config = CapaConfig(**{**config.to_dict(), "prune": profile.prune})
    config.check_for_model(adapter.num_layers)
    config.check_for_visual_tokens(adapter.num_visual_tokens_per_image())
    check_topk_limit(config, backend_name, profile.pruning)
    if backend_name == "onnxruntime":
        backends.ort.usable_providers(profile.providers)

    work = make_work_dir(final)
    try:
        config.save(_mkdir(work / "capa"))
        if approx is not None:
            approx.save(work / "capa")
        processor.save_pretrained(str(work / "processor"))
        log(f"[2/4] exporting ONNX ({profile.precision}, pruning lowering: {profile.pruning}) ...")
        export_model(model, processor, config, approx, work / "onnx", dtype=profile.precision,
                     pruning=profile.pruning, model_name=model_name, progress=progress)
        export_info = json.loads((work / "onnx" / "export.json").read_text())
        log(f"[3/4] building the {backend_name} engine ...")
        backend_dir = work / backend_name
        if backend_name == "tensorrt":
            graph_inputs = _symbolic_inputs(work / "onnx")
            fixed = {"visual_tokens": adapter.num_visual_tokens_per_image()}
            description = backends.trt.build(work / "onnx", profile, backend_dir, GRAPHS, graph_inputs, fixed,
                                             plugin_library)
        else:
            description = backends.ort.build(work / "onnx", profile, backend_dir, GRAPHS)
        fields = {"model": export_info["model"], "capa_config": config.to_dict(), "ffn_layers": export_info["ffn_layers"],
                  "profile": profile.to_dict(), "backend": backend_name, "backend_dir": backend_name,
                  "backend_description": description, "dtype": profile.precision, "pruning": profile.pruning,
                  "k": export_info["k"], "layer_segment": export_info["layer_segment"],
                  "libraries": export_info["libraries"], "build_seconds": None}
        write_manifest(work, fields, complete=False)
        log("[4/4] validating against the PyTorch CapaModel (Polygraphy) ...")
        report = validate_engine(work, model, processor, validation_samples, max_new_tokens)
        manifest = json.loads((work / "manifest.json").read_text())
        manifest["build_seconds"] = round(time.perf_counter() - start, 1)
        write_json(work / "manifest.json", manifest)
        target = final if report["passed"] else final.with_name(final.name + ".failed")
        _replace(work, target)
        return target, report
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _symbolic_inputs(onnx_dir: Path) -> dict:
    import onnx

    result = {}
    for graph in GRAPHS:
        model = onnx.load(str(onnx_dir / f"{graph}.onnx"), load_external_data=False)
        result[graph] = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                         for i in model.graph.input}
    return result


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace(source: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        source.rename(target)
