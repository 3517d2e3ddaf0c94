"""The pipeline's stages, as the CLI, the Python API and the tests call them:

    analyze    model + an image and question + calibration inputs -> analysis folder (report.json, plots)
    calibrate  model + calibration inputs -> calibration folder (capa_config.json, ffn_approx.*, calibration.json)
    generate   model (+ calibration folder) + an image and question -> tokens (the PyTorch reference)
    export     model + calibration folder -> ONNX folder (four graphs, weights.data, export.json)
    build      model -> calibration -> ONNX -> engine -> validation, into one engine folder
    validate   engine folder + the model -> validation.json; the engine marked complete or not

Every stage reads what it is given, refuses bad input in one line (CapaError) before any work,
and writes its folder under a temporary name, renamed when complete.

An engine folder (`build`; the manifest's format is in manifest.py):

    <engine>/manifest.json      what, from what, settings, graph contract, versions, checksums, validation summary
             validation.json    Polygraphy comparisons per graph and output, token agreement (build's)
             revalidation.json  the same from the latest `validate` (build's report is kept)
             calibration/       capa_config.json, ffn_approx.safetensors/.json
             processor/         tokenizer + image processor (save_pretrained)
             onnx/              vision/embed/prefill/decode.onnx, weights.data, export.json
             <backend>/         the backend's engine files (onnxruntime: *.opt.onnx + session.json;
                                tensorrt: *.plan, timing cache)

It is marked complete (manifest.json "complete": true) only when validation passed; a build whose
validation fails is kept as `<name>.failed/` for inspection, and an interrupted one leaves only a
hidden temporary folder, never a directory that looks complete.
"""

from __future__ import annotations

import ctypes
import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import backends
from .artifacts import check_replaceable, commit_directory, make_work_dir, output_lock, replace_directory, write_json
from .config import CapaConfig
from .errors import CapaError
from .inputs import CalibrationSample, builtin_samples, encode
from .contract import GRAPHS
from .folders import read_json
from .manifest import (ANALYSIS, CALIBRATION, ENGINE, ONNX, REVALIDATION_FILE, SIGNATURE_FILE, VALIDATION_FILE,
                       read_json_manifest, read_manifest, write_manifest)
from .method.capa_model import apply_capa
from .method.ffn import META_FILE, FfnApproximation, fit_ffn_approximation
from .models import adapter_for, load_model
from .profiles import BuildProfile

DEFAULT_MODEL = "tiny-llava"
#: where `build` puts engines by default: engines/<model>-<profile>
DEFAULT_ENGINE_ROOT = Path("engines")
#: the engine folder's sub-folder holding the CAPA config and the FFN approximation
CALIBRATION_DIR = "calibration"


# --- CAPA settings ----------------------------------------------------------------------------------
def load_calibration(model, calibration_dir: str | Path) -> tuple[CapaConfig, FfnApproximation | None]:
    """(CapaConfig, FfnApproximation | None) from a `calibrate` folder (or an engine's calibration/)."""
    config = CapaConfig.load(calibration_dir)
    approx = FfnApproximation.load(calibration_dir, model) if (Path(calibration_dir) / META_FILE).exists() else None
    return config, approx


def fit_calibration(model, processor, config: CapaConfig, samples: list[CalibrationSample],
                    progress: bool = True) -> tuple[CapaConfig, FfnApproximation | None]:
    """Fit the FFN approximation `config` asks for on `samples`; "auto" is frozen into the layers
    the fit selected, so the returned config names them."""
    adapter = adapter_for(model)
    config.check_for_model(adapter.num_layers)
    if not config.ffn_layers:
        return config, None
    inputs = [encode(adapter, processor, s) for s in samples]
    approx = fit_ffn_approximation(model, inputs, config.ffn_layers, ridge=config.ffn_ridge, rank=config.ffn_rank,
                                   threshold=config.ffn_threshold,
                                   layer_range=config.resolved_ffn_range(adapter.num_layers), progress=progress)
    if config.ffn_layers == "auto":
        config = CapaConfig(**{**config.to_dict(), "ffn_layers": list(approx.selected_layers)})
    return config, approx


def calibrated_config(model, processor, calibration_dir: str | None, calibration_samples=None, progress=True,
                      base: CapaConfig | None = None):
    """From a `calibrate` folder, or calibrated now on the given (default: built-in) inputs with
    `base` (default: the default CapaConfig with automatic FFN layer selection)."""
    if calibration_dir:
        return load_calibration(model, calibration_dir)
    return fit_calibration(model, processor, base or CapaConfig(ffn_layers="auto"),
                           calibration_samples or builtin_samples(8), progress)


def with_prune(config: CapaConfig, prune) -> CapaConfig:
    """The config with another pruning schedule (None keeps it)."""
    return config if prune is None else CapaConfig(**{**config.to_dict(), "prune": prune})


# --- stages -----------------------------------------------------------------------------------------
def analyze(model_name: str = DEFAULT_MODEL, out: str | Path = "out/analysis", *, sample: CalibrationSample,
            calibration_samples: list[CalibrationSample], settings=None, dtype=None, device=None,
            progress: bool = True, force: bool = False) -> tuple[Path, dict]:
    from .analysis import AnalysisSettings
    from .analysis import analyze as analyze_model
    from .analysis.plots import write_plots

    check_replaceable(out, ANALYSIS, force)  # before the work, not after
    settings = settings or AnalysisSettings()
    model, processor = load_model(model_name, dtype, device)
    report, raw = analyze_model(model, processor, sample, calibration_samples, settings, progress=progress)

    def write(tmp: Path):
        write_manifest(tmp, ANALYSIS, report)
        write_plots(report, raw["per_layer"], tmp)

    with output_lock(out):
        return replace_directory(out, write, ANALYSIS, force), report


def calibrate(model_name: str = DEFAULT_MODEL, out: str | Path = "out/calibration", *, config: CapaConfig,
              calibration_samples: list[CalibrationSample], dtype=None, device=None,
              progress: bool = True, force: bool = False) -> tuple[Path, CapaConfig, FfnApproximation | None]:
    """Fit the FFN approximation and write a calibration folder."""
    check_replaceable(out, CALIBRATION, force)
    model, processor = load_model(model_name, dtype, device)
    adapter = adapter_for(model)
    config.check_for_model(adapter.num_layers)
    config.check_for_visual_tokens(adapter.family.visual_token_range(processor)[0])  # refused now, not at build time
    config, approx = fit_calibration(model, processor, config, calibration_samples, progress)

    def write(tmp: Path):
        config.save(tmp)
        if approx is not None:
            approx.save(tmp)
        write_manifest(tmp, CALIBRATION, {
            "model": model_name,
            "calibration_inputs": [s.source for s in calibration_samples],
            "capa_config": config.to_dict(),
            "ffn_errors": {str(k): v for k, v in (approx.errors() if approx else {}).items()},
        })

    with output_lock(out):
        return replace_directory(out, write, CALIBRATION, force), config, approx


@dataclass
class GenerateResult:
    tokens: list[int]
    text: str
    keep_indices: list[int]
    agreement_with_unpruned: float
    prompt_tokens: int
    visual_tokens: int
    seconds: float
    config: CapaConfig


def generate(model_name: str = DEFAULT_MODEL, *, sample: CalibrationSample, config: CapaConfig | None = None,
             calibration_dir: str | None = None, max_new_tokens: int = 16, dtype=None, device=None) -> GenerateResult:
    """Greedy generation with the CapaModel (the PyTorch reference), and its agreement with the
    unpruned model on the same input."""
    if max_new_tokens < 1:
        raise CapaError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    model, processor = load_model(model_name, dtype, device)
    if calibration_dir:
        config, approx = load_calibration(model, calibration_dir)
    else:
        config, approx = config or CapaConfig(), None
        if config.ffn_layers == "auto":  # nothing fitted: no approximation
            config = CapaConfig(**{**config.to_dict(), "ffn_layers": []})
    adapter = adapter_for(model)
    batch = encode(adapter, processor, sample)
    capa = apply_capa(model, config, approx)
    start = time.perf_counter()
    tokens, prefill = capa.generate(**batch, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    baseline, _ = apply_capa(model, CapaConfig(prune=[])).generate(**batch, max_new_tokens=max_new_tokens)
    agreement = float((tokens == baseline[:, : tokens.shape[1]]).float().mean())
    return GenerateResult(tokens[0].tolist(), processor.tokenizer.decode(tokens[0], skip_special_tokens=True),
                          prefill.keep_indices[0].tolist(), agreement, int(batch["input_ids"].shape[1]),
                          int(capa.visual_slots(batch["input_ids"], batch).shape[1]), seconds, config)


def calibrated_in_fp32(model_name: str, calibration_samples=None, device=None, progress: bool = True,
                       base: CapaConfig | None = None):
    """(CapaConfig, FfnApproximation | None) fitted now on the model loaded in fp32, whose memory is
    given back before returning: the caller loads the model again in the dtype it needs, so an fp32
    copy never sits beside an fp16 one."""
    model, processor = load_model(model_name, "fp32", device)
    config, approx = calibrated_config(model, processor, None, calibration_samples, progress, base)
    del model
    return config, approx


def export(model_name: str = DEFAULT_MODEL, out: str | Path = "out/onnx", *, calibration_dir: str | None = None,
           prune=None, dtype: str = "fp32", pruning: str = "function", attention: str = "fused",
           attention_blocks: int = 1, device=None, progress: bool = True, force: bool = False) -> tuple[Path, dict]:
    from .export.exporter import check_attention_blocks, export_model

    check_attention_blocks(attention_blocks, attention, "--attention-blocks")
    check_replaceable(out, ONNX, force)
    if calibration_dir:
        model, processor = load_model(model_name, dtype, device)  # in the graph's dtype: no second copy
        config, approx = load_calibration(model, calibration_dir)
    else:
        config, approx = calibrated_in_fp32(model_name, device=device, progress=progress)
        model, processor = load_model(model_name, dtype, device)
    config = with_prune(config, prune)
    with output_lock(out):
        check_replaceable(out, ONNX, force)  # again: another command may have written it meanwhile
        path = export_model(model, processor, config, approx, out, dtype=dtype, pruning=pruning, attention=attention,
                            attention_blocks=attention_blocks, model_name=model_name, progress=progress)
    return path, read_json_manifest(path, ONNX, "an ONNX export")


def validation_inputs(adapter, processor, samples=None) -> list[dict]:
    samples = samples or builtin_samples(1, seed=7)
    return [encode(adapter, processor, s) for s in samples]


def check_engine_model(manifest: dict, adapter, engine_dir: Path) -> None:
    """The reference model must be the one the engine describes (its family's own description)."""
    recorded = manifest["model"]
    for key, value in adapter.describe().items():
        if key in recorded and recorded[key] != value:
            raise CapaError(f"engine {engine_dir} was built from another model ({key} {str(recorded[key])[:40]} in its "
                            f"manifest, {value} in the model given); pass --model with the model it was built from")


def give_back_memory() -> None:
    """Collect, then ask glibc to return freed heap memory to the system (malloc_trim), so that a
    stage's freed tensors do not stay in the process under the next stage's peak. (The 5.3 GB a
    mid build held in validation with its reference deleted was the exporter's leak, fixed in
    `export.exporter._forget_rewriter_matches`; the trim's own share was not measured apart.)"""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator's own policy applies
        pass


class ReferenceModel:
    """The fp32 model a validation compares with, handed over in a holder so that validation can
    give it back once the PyTorch side is computed (a caller's own variable would keep it alive
    while the engine's sessions load, and the two would add up)."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def take(self):
        model, self.model = self.model, None
        return model


def validate_engine(engine_dir: Path, reference_model: ReferenceModel, samples=None, max_new_tokens: int = 8,
                    write: bool = True, sign_key=None, plugin_library: str | None = None,
                    allow_engine_code: bool = False, report_file: str = VALIDATION_FILE) -> dict:
    """Validate an engine directory against the CapaModel (fp32) rebuilt from its own calibration/.
    The reference's outputs are computed first and its model given back; then the engine's graphs
    run one session at a time, then the engine end to end.
    Writes report_file (build: validation.json; `validate`: revalidation.json, beside the build's)
    and rewrites manifest.json with complete = passed, holding a lock on the
    folder (a second writer is refused). A signature the rewrite made stale is removed; with
    sign_key, a passed engine is signed again."""
    from . import signing
    from .folders import confined_directory, folder_lock
    from .runtime import CapaEngine, engine_backend
    from .validate import (TOLERANCES, EngineGraphRunner, compare_graph, format_report, reference_results,
                           token_agreement)

    engine_dir = Path(engine_dir)
    with folder_lock(engine_dir, blocking=False):
        manifest = read_manifest(engine_dir, verify=True, require_complete=False)
        dtype = manifest["dtype"]
        model = reference_model.take()
        adapter = adapter_for(model)
        check_engine_model(manifest, adapter, engine_dir)
        config, approx = load_calibration(model, confined_directory(engine_dir, CALIBRATION_DIR, source=str(engine_dir)))
        batches = validation_inputs(adapter, reference_model.processor, samples)
        contract = adapter.family.graph_contract(manifest["layer_segment"])
        backend, backend_dir, files = engine_backend(engine_dir, manifest)
        backend.require()
        reference = reference_results(apply_capa(model, config, approx), apply_capa(model, CapaConfig(prune=[])),
                                      batches, dtype, contract, GRAPHS, max_new_tokens)
        del model, adapter, approx
        give_back_memory()
        graphs = {}
        for graph in GRAPHS:  # one session at a time
            engine_graph = backend.graph(backend_dir, graph, spec=contract[graph], dtype=dtype, files=files,
                                         plugin_library=plugin_library, allow_engine_code=allow_engine_code)
            try:
                graphs[graph] = compare_graph(EngineGraphRunner(engine_graph, dtype), reference, graph)
            finally:
                engine_graph.close()
            del engine_graph
        give_back_memory()
        with CapaEngine(engine_dir, verify=False, require_complete=False, plugin_library=plugin_library,
                        allow_engine_code=allow_engine_code) as engine:
            end_to_end = [token_agreement(engine, tokens, b) for tokens, b in zip(reference.tokens, batches)]
        # fp32: free-running greedy tokens must all agree. Reduced precision may flip a near-tie and
        # then drift, so it is held to the teacher-forced agreement: at each step, fed the reference's
        # tokens, the engine's argmax must match the reference's next token.
        measure, required = ("agreement", 1.0) if dtype == "fp32" else ("forced_agreement", 0.9)
        passed = all(g["passed"] for g in graphs.values()) and all(e[measure] >= required for e in end_to_end)
        report = {"passed": passed, "dtype": dtype, "backend": manifest["backend"], "tolerances": TOLERANCES[dtype],
                  "required_agreement": required, "agreement_measure": measure, "max_new_tokens": max_new_tokens,
                  "graphs": graphs, "end_to_end": end_to_end, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        if write:
            write_json(engine_dir / report_file, report)
            fields = {k: v for k, v in manifest.items() if k not in ("complete", "files")}
            fields["validation"] = {"passed": passed, "agreement": [e["agreement"] for e in end_to_end],
                                    "graphs": {g: r["passed"] for g, r in graphs.items()}}
            write_manifest(engine_dir, ENGINE, fields, complete=passed)
            if signing.signature_is_current(engine_dir) is False:
                # the rewrite changed the manifest: the old signature would only say "modified"
                (engine_dir / SIGNATURE_FILE).unlink()
                report["signature"] = "removed: validation rewrote manifest.json; sign it again with --sign"
    if write and sign_key is not None and passed:
        signing.sign_folder(engine_dir, sign_key)
        report["signature"] = "signed"
    report["table"] = format_report(report)
    return report


def reference_model(manifest: dict, model_name: str | None, engine_dir) -> str:
    """The model `validate` compares with: --model, else the embedded model the manifest names.
    A path or hub id read from the manifest is never loaded on the folder's word (it could name any
    directory, or a download)."""
    from .models.registry import embedded_models

    if model_name:
        return model_name
    recorded = manifest["model"].get("name")
    if recorded in embedded_models():
        return recorded
    shown = "no model" if recorded is None else f"the model {str(recorded)[:80]!r}"
    raise CapaError(f"{engine_dir}/manifest.json names {shown}, which validate does not load on the folder's word "
                    f"(only embedded models are); pass --model with the model this engine was built from")


def validate(engine_dir: str | Path, model_name: str | None = None, samples=None, max_new_tokens: int = 8, *,
             trust=None, sign_key=None, plugin_library: str | None = None, allow_engine_code: bool = False) -> dict:
    """`capa-export validate`: the engine against `model_name`, or the embedded model its manifest
    names (see reference_model). trust: the folder's signature must verify with this public key
    first; sign_key: sign the folder again once it passed."""
    from .signing import check_private_key

    if sign_key is not None:
        check_private_key(sign_key)
    manifest = read_manifest(engine_dir, verify=True, require_complete=False, trust=trust)
    reference = ReferenceModel(*load_model(reference_model(manifest, model_name, engine_dir), "fp32"))
    return validate_engine(Path(engine_dir), reference, samples, max_new_tokens, sign_key=sign_key,
                           plugin_library=plugin_library, allow_engine_code=allow_engine_code,
                           report_file=REVALIDATION_FILE)


def build(model_name: str = DEFAULT_MODEL, profile_name: str = "cpu", out: str | Path | None = None,
          calibration_dir: str | None = None, backend: str | None = None, pruning: str | None = None,
          plugin_library: str | None = None, calibration_samples=None, validation_samples=None,
          max_new_tokens: int = 8, progress: bool = True, log=print, sign_key=None,
          force: bool = False, prune=None, keep: int | None = None, analysis_dir: str | None = None
          ) -> tuple[Path, dict]:
    """Model -> CAPA (calibrating unless calibration_dir) -> ONNX -> engine -> validation.
    sign_key (a PEM private key, bytes or path): a validated engine is signed (manifest.sig).
    force: replace a complete engine at `out` (without it, that is refused). Two builds into one
    folder at once: the second is refused (output_lock).
    prune: [(K, k), ...] stages, [] for none, or "auto" (analyze's suggested layer and FFN range,
    from the report in analysis_dir, else from an analysis run now); keep: the single stage's k
    (capa_export.choices). Without either, the profile's / calibration's schedule."""
    final = Path(out) if out else DEFAULT_ENGINE_ROOT / f"{Path(model_name).name}-{BuildProfile.load(profile_name).name}"
    with output_lock(final):
        return _build(model_name, profile_name, final, calibration_dir, backend, pruning, plugin_library,
                      calibration_samples, validation_samples, max_new_tokens, progress, log, sign_key, force,
                      prune, keep, analysis_dir)


def _build(model_name, profile_name, out, calibration_dir, backend, pruning, plugin_library, calibration_samples,
           validation_samples, max_new_tokens, progress, log, sign_key, force, prune, keep,
           analysis_dir) -> tuple[Path, dict]:
    from . import choices
    from .export.exporter import export_model
    from .signing import check_private_key, sign_folder

    choices.check_choice(prune, keep)
    if analysis_dir is not None and prune != "auto":
        raise CapaError(f"--analysis {analysis_dir} is read by --prune auto only; add --prune auto, or leave it out")
    suggestion = choices.read_suggestion(analysis_dir) if analysis_dir else None  # a bad report: refused now

    if sign_key is not None:
        check_private_key(sign_key)  # before minutes of work, not after

    profile = BuildProfile.load(profile_name)
    if pruning:
        profile.pruning = pruning
    if prune != "auto" or suggestion is not None:
        chosen = choices.stages(prune, keep, suggestion)
        if chosen is not None:
            profile.prune = CapaConfig(prune=chosen).prune
    engine_backend = backends.get(backend or profile.backend)
    engine_backend.check_precision(profile)  # before any work: bf16 where nothing here can run it
    name = f"{Path(model_name).name}-{profile.name}"
    final = Path(out) if out else DEFAULT_ENGINE_ROOT / name
    check_replaceable(final, ENGINE, force)
    check_replaceable(final.with_name(final.name + ".failed"), ENGINE, force)
    if plugin_library is not None and not Path(plugin_library).is_file():
        raise CapaError(f"plugin library {plugin_library} does not exist; build it with cmake (target "
                        f"capa_contrib_topk_plugin) or leave --plugin-library out")
    if profile.prune is not None:  # a bad override is refused before the minutes of calibration
        engine_backend.check(profile, CapaConfig(prune=profile.prune), plugin_library=plugin_library)

    start = time.perf_counter()
    # The model is loaded in the dtype each step needs and given back after it (calibration and the
    # validation reference in fp32, the export in the engine's precision): one copy at a time.
    model, processor = load_model(model_name, profile.precision)
    adapter = adapter_for(model)
    dims = adapter.family.dim_ranges(processor, profile.shapes)
    num_layers = adapter.num_layers
    base = None
    if prune == "auto":
        fingerprint = {k: v for k, v in adapter.fingerprint().items() if k != "weight_sample"}
        if suggestion is not None:
            choices.read_suggestion(analysis_dir, fingerprint)  # the analysis must be of this model
        else:
            log(f"analysing {model_name} for --prune auto (keep a report with `capa-export analyze`, then "
                f"pass --analysis DIR)")
            suggestion = _suggest_now(model_name, model, processor, profile.precision, keep, calibration_samples,
                                      progress)
        profile.prune = CapaConfig(prune=choices.stages("auto", keep, suggestion)).prune
        base = CapaConfig(ffn_layers="auto" if suggestion.ffn_range else [], ffn_range=suggestion.ffn_range)
        log(f"      --prune auto: prune at layer {profile.prune[0][0]} keeping {profile.prune[0][1]}, FFN range "
            f"{list(suggestion.ffn_range) if suggestion.ffn_range else 'none'} ({suggestion.source})")
    if profile.prune is not None:
        override = CapaConfig(prune=profile.prune)
        override.check_for_model(num_layers)
        check_keep_for_engine(override, dims)
    log(f"[1/4] CAPA config for {model_name} "
        f"({'from ' + calibration_dir if calibration_dir else 'calibrating on built-in inputs'})")
    if calibration_dir or profile.precision == "fp32":
        config, approx = calibrated_config(model, processor, calibration_dir, calibration_samples, progress, base)
    else:
        del model, adapter
        config, approx = calibrated_in_fp32(model_name, calibration_samples, progress=progress, base=base)
        model, processor = load_model(model_name, profile.precision)
        adapter = adapter_for(model)
    config = with_prune(config, profile.prune)
    config.check_for_model(num_layers)
    check_keep_for_engine(config, dims)
    engine_backend.check(profile, config, plugin_library=plugin_library, max_visual=dims["visual_tokens"][2])

    work = make_work_dir(final)
    try:
        config.save(_mkdir(work / CALIBRATION_DIR))
        if approx is not None:
            approx.save(work / CALIBRATION_DIR)
        processor.save_pretrained(str(work / "processor"))
        log(f"[2/4] exporting ONNX ({profile.precision}, pruning lowering: {profile.pruning}, "
            f"attention: {profile.attention}) ...")
        export_model(model, processor, config, approx, work / "onnx", dtype=profile.precision,
                     pruning=profile.pruning, attention=profile.attention, attention_blocks=profile.attention_blocks,
                     model_name=model_name, progress=progress)
        export_info = read_json_manifest(work / "onnx", ONNX, "an ONNX export")
        contract = adapter.family.graph_contract(export_info["layer_segment"])
        # The PyTorch model is given back while the engine builds and loaded again (fp32) for
        # validation: it and the backend's copy of the weights were in memory together.
        del model, adapter, approx
        give_back_memory()
        log(f"[3/4] building the {engine_backend.name} engine ...")
        description = engine_backend.build(work / "onnx", profile, work / engine_backend.name, contract,
                                           fixed_dims=dims, plugin_library=plugin_library)
        fields = {"model": export_info["model"], "capa_config": config.to_dict(), "ffn_layers": export_info["ffn_layers"],
                  "profile": profile.to_dict(), "backend": engine_backend.name, "backend_dir": engine_backend.name,
                  "backend_description": description, "dtype": profile.precision, "pruning": profile.pruning,
                  "attention": export_info["attention"], "attention_blocks": export_info["attention_blocks"],
                  "k": export_info["k"],
                  "layer_segment": export_info["layer_segment"],
                  "vision_dims": {name: list(value) for name, value in dims.items()},
                  "graph_contract": export_info["graph_contract"], "build_seconds": None}
        write_manifest(work, ENGINE, fields, complete=False)
        log("[4/4] validating against the PyTorch CapaModel (Polygraphy) ...")
        report = validate_engine(work, ReferenceModel(*load_model(model_name, "fp32")), validation_samples, max_new_tokens,
                                 plugin_library=plugin_library)
        manifest = read_json(work / ENGINE.file)
        manifest["build_seconds"] = round(time.perf_counter() - start, 1)
        write_json(work / ENGINE.file, manifest)
        if sign_key is not None and report["passed"]:
            sign_folder(work, sign_key)  # last: the signature covers the final manifest
            report["signature"] = "signed"
        target = final if report["passed"] else final.with_name(final.name + ".failed")
        commit_directory(work, target)
        return target, report
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _suggest_now(model_name, model, processor, precision, keep, calibration_samples, progress):
    """analyze's suggestion for this model, computed now (in fp32, as `analyze` does)."""
    from .analysis import AnalysisSettings
    from .analysis import analyze as analyze_model
    from .choices import DEFAULT_KEEP, suggestion_from_report

    if precision != "fp32":
        model, processor = load_model(model_name, "fp32")
    sample = builtin_samples(1, seed=1)[0]
    report, _ = analyze_model(model, processor, sample, calibration_samples or builtin_samples(8),
                              AnalysisSettings(keep=keep or DEFAULT_KEEP), progress=progress)
    return suggestion_from_report(report, "an analysis of this model on the built-in inputs")


def check_keep_for_engine(config: CapaConfig, dims: dict) -> None:
    """Every keep count within the fewest visual tokens an image the engine takes can give."""
    fewest = dims["visual_tokens"][0]
    for layer, keep in config.prune:
        if isinstance(keep, float):  # a fraction of each image's tokens always fits
            continue
        if keep > fewest:
            where = (f"the smallest image the profile allows ({dims['pixels'][0]} pixels, shapes.pixels)"
                     if "pixels" in dims else "an image")
            raise CapaError(f"prune stage at layer {layer} keeps k={keep} but {where} gives only {fewest} visual "
                            f"tokens: k must be in [1, {fewest}]" +
                            (f", or raise shapes.pixels' minimum to at least {keep * dims['pixels'][0] // fewest}"
                             if "pixels" in dims else ""))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
