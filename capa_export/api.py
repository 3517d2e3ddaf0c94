"""The Python API: one function per CLI command, with the CLI's option names and defaults.

    import capa_export as ce
    ce.analyze(...)          capa-export analyze
    ce.calibrate(...)        capa-export calibrate
    ce.generate(...)         capa-export generate
    ce.export_onnx(...)      capa-export export     (`capa_export.export` is the exporter's subpackage)
    ce.build(...)            capa-export build
    ce.validate_engine(...)  capa-export validate   (`capa_export.validate` is the validation module)
    ce.CapaEngine(path)      capa-export run

Images are paths or PIL images; prompts are strings. Each function returns what the command
prints from: (folder, report) pairs, a GenerateResult, or the validation report.
"""

from __future__ import annotations

from pathlib import Path

from . import pipeline
from .errors import CapaError

DEFAULT_QUESTION = "What is in the picture? Describe it briefly."


def _sample(image, prompt: str, max_image_pixels: int | None = None):
    from .inputs import CalibrationSample, builtin_samples, check_prompt, open_image

    check_prompt(prompt, "prompt")
    if image is None:
        sample = builtin_samples(1, seed=1)[0]
        sample.question = prompt
        return sample
    if isinstance(image, (str, Path)):
        from .folders import MAX_IMAGE_PIXELS

        return CalibrationSample(open_image(str(image), max_image_pixels or MAX_IMAGE_PIXELS), prompt, str(image))
    if hasattr(image, "convert"):  # a PIL image
        return CalibrationSample(image.convert("RGB"), prompt, "python:image")
    raise CapaError(f"image must be a file path or a PIL image, got {type(image).__name__}")


def _calibration(calibration_images, calibration_count: int, max_image_pixels: int | None = None):
    from .inputs import builtin_samples, folder_samples

    if calibration_images:
        from .folders import MAX_IMAGE_PIXELS

        return folder_samples(str(calibration_images), max_image_pixels or MAX_IMAGE_PIXELS)
    if calibration_count < 1:
        raise CapaError(f"calibration_count {calibration_count} must be >= 1")
    return builtin_samples(calibration_count)


def _schedule(prune, allow_auto: bool = False):
    if prune is None or (prune == "auto" and allow_auto):
        return prune
    if prune == "none":
        return []
    if isinstance(prune, str):
        raise CapaError(f"prune {prune!r} must be a list of (layer, keep) stages, 'none'" +
                        (", or 'auto'" if allow_auto else ""))
    return [tuple(stage) for stage in prune]


def analyze(model: str = pipeline.DEFAULT_MODEL, out: str | Path = "out/analysis", *, image=None,
            prompt: str = DEFAULT_QUESTION, calibration_images=None, calibration_count: int = 8, keep: int = 64,
            sink_ratio: float = 5.0, ffn_threshold: float = 0.15, dtype=None, device=None, force: bool = False,
            progress: bool = True) -> tuple[Path, dict]:
    """Sinks, attention vs contribution, FFN linearity and the suggested settings -> (folder, report)."""
    from .analysis import AnalysisSettings

    settings = AnalysisSettings(sink_ratio=sink_ratio, keep=keep, ffn_threshold=ffn_threshold)
    return pipeline.analyze(model, out, sample=_sample(image, prompt),
                            calibration_samples=_calibration(calibration_images, calibration_count),
                            settings=settings, dtype=dtype, device=device, progress=progress, force=force)


def calibrate(model: str = pipeline.DEFAULT_MODEL, out: str | Path = "out/calibration", *, prune=((2, 64),),
              variant: str = "contrib", queries: str = "text", ffn_layers="auto", ffn_threshold: float = 0.15,
              ffn_range=None, ridge: float = 1e-3, rank=None, calibration_images=None, calibration_count: int = 8,
              dtype=None, device=None, force: bool = False, progress: bool = True):
    """Fit the FFN approximation -> (folder, CapaConfig, FfnApproximation | None)."""
    from .config import CapaConfig

    config = CapaConfig(prune=_schedule(prune), variant=variant, queries=queries, ffn_layers=ffn_layers,
                        ffn_threshold=ffn_threshold, ffn_range=ffn_range, ffn_ridge=ridge, ffn_rank=rank)
    return pipeline.calibrate(model, out, config=config,
                              calibration_samples=_calibration(calibration_images, calibration_count), dtype=dtype,
                              device=device, progress=progress, force=force)


def generate(model: str = pipeline.DEFAULT_MODEL, *, image=None, prompt: str = DEFAULT_QUESTION,
             prune=((2, 64),), calibrated=None, max_new_tokens: int = 16, dtype=None, device=None):
    """Greedy generation with the PyTorch CapaModel -> GenerateResult (.text, .tokens, .keep_indices...)."""
    from .config import CapaConfig

    return pipeline.generate(model, sample=_sample(image, prompt), config=CapaConfig(prune=_schedule(prune)),
                             calibration_dir=calibrated, max_new_tokens=max_new_tokens, dtype=dtype, device=device)


def export_onnx(model: str = pipeline.DEFAULT_MODEL, out: str | Path = "out/onnx", *, calibrated=None, prune=None,
                dtype: str = "fp32", pruning: str = "function", attention: str = "fused", device=None,
                force: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """The four ONNX graphs -> (folder, export.json as a dict)."""
    return pipeline.export(model, out, calibration_dir=calibrated, prune=_schedule(prune), dtype=dtype,
                           pruning=pruning, attention=attention, device=device, progress=progress, force=force)


def build(model: str = pipeline.DEFAULT_MODEL, profile: str = "cpu", out: str | Path | None = None, *,
          calibrated=None, prune=None, keep: int | None = None, analysis=None, backend=None, pruning=None,
          plugin_library=None, calibration_images=None, calibration_count: int = 8, image=None,
          prompt: str = DEFAULT_QUESTION, validate_tokens: int = 8, sign=None, force: bool = False,
          progress: bool = True, log=None) -> tuple[Path, dict]:
    """Calibrate, export, build and validate -> (engine folder, validation report). The folder is
    `<out>` when validation passed, `<out>.failed` otherwise (report["passed"] says which)."""
    from . import logs

    return pipeline.build(model, profile, out=out, calibration_dir=calibrated, backend=backend, pruning=pruning,
                          plugin_library=plugin_library,
                          calibration_samples=_calibration(calibration_images, calibration_count),
                          validation_samples=[_sample(image, prompt)] if image is not None else None,
                          max_new_tokens=validate_tokens, progress=progress, log=log or logs.info, sign_key=sign,
                          force=force, prune=_schedule(prune, allow_auto=True), keep=keep, analysis_dir=analysis)


def validate_engine(engine: str | Path, model: str | None = None, *, image=None, prompt: str = DEFAULT_QUESTION,
                    tokens: int = 8, trust=None, sign=None, plugin_library=None,
                    allow_engine_code: bool = False) -> dict:
    """Compare an engine with the PyTorch CapaModel -> the report (also in <engine>/revalidation.json)."""
    return pipeline.validate(engine, model, [_sample(image, prompt)] if image is not None else None, tokens,
                             trust=trust, sign_key=sign, plugin_library=plugin_library,
                             allow_engine_code=allow_engine_code)
