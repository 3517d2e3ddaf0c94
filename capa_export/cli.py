"""`capa-export` command line. Thin: parse, call a stage, print. Errors in what the user gave end
with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .artifacts import check_replaceable
from .dtypes import NAMES as FLOAT_TYPE_NAMES
from . import logs
from .errors import CapaError
from .method.scoring import VARIANTS
from .pipeline import DEFAULT_MODEL
DEFAULT_QUESTION = "What is in the picture? Describe it briefly."


# --- argument helpers ----------------------------------------------------------------------------
def _stage(text: str) -> tuple[int, int | float] | str:
    """LAYER:KEEP, KEEP a count (2:64) or a fraction of the visual tokens (2:0.25); or none / auto."""
    if text in ("none", "auto"):
        return text
    try:
        layer, keep = text.split(":")
        return int(layer), float(keep) if any(c in keep for c in ".eE") else int(keep)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:KEEP with KEEP a count or a fraction "
                                         f"(e.g. 2:64 or 2:0.25), none or auto") from None


def _keep(text: str) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (64) or a fraction (0.25)") from None


def _schedule(stages, allow_auto: bool = False):
    """--prune's values: the stages, [] for none, "auto" where the command takes it; None if not given."""
    if stages is None:
        return None
    words = [s for s in stages if isinstance(s, str)]
    if not words:
        return list(stages)
    if len(stages) > 1:
        raise CapaError(f"--prune {words[0]} stands alone; give it, or LAYER:KEEP stages, not both")
    if words[0] == "auto" and not allow_auto:
        raise CapaError("--prune auto is taken by build only (it reads analyze's suggestion); give LAYER:KEEP stages, "
                        "or none")
    return [] if words[0] == "none" else "auto"


def _lowering(text: str) -> str:
    from .export.graphs import pruning_lowering

    try:
        return pruning_lowering(text)
    except CapaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _layers(text: str):
    if text in ("auto", "none"):
        return "auto" if text == "auto" else []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto', 'none' or a comma-separated list of layers") from None


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = text.split(":")
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST:LAST (e.g. 2:20)") from None


def _add_model(parser, dtype_help="weights dtype when loading (default: the checkpoint's; fp32 for tiny-llava)"):
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (embedded, offline), a local HF model directory, or a hub id "
                             f"(default: {DEFAULT_MODEL})")
    if dtype_help:
        parser.add_argument("--dtype", choices=FLOAT_TYPE_NAMES, default=None, help=dtype_help)
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_input(parser):
    parser.add_argument("--image", default=None, help="image file (default: a built-in synthetic picture)")
    parser.add_argument("--prompt", default=DEFAULT_QUESTION, help="question about the image")
    _add_pixel_cap(parser)


def _add_pixel_cap(parser):
    from .folders import MAX_IMAGE_PIXELS

    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                        help=f"refuse images whose header claims more pixels, before decoding them (default: "
                             f"{MAX_IMAGE_PIXELS})")


def _add_serving(parser):
    parser.add_argument("--instances", type=int, default=1, help="model instances, each with its engine (default: 1)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="requests per engine run (default: the engine's profile maximum)")
    parser.add_argument("--max-queue-delay-us", type=int, default=5000,
                        help="how long a request may wait for others to batch with (default: 5000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads per instance (default: its own choice)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="new tokens for requests that do not say (default: 32)")
    parser.add_argument("--trust", default=None, metavar="PUBKEY",
                        help="PEM public key (capa-export keygen): the engine's signature must verify with it")
    parser.add_argument("--stream", action="store_true",
                        help="add the decoupled model capa_stream: the answer piece by piece over gRPC streaming "
                             "(one more engine instance)")


def _add_trust(parser):
    parser.add_argument("--trust", default=None, metavar="PUBKEY",
                        help="PEM public key (capa-export keygen): the engine's signature (manifest.sig) must verify "
                             "with it, and every file its manifest lists is checked")
    parser.add_argument("--plugin-library", default=None, metavar="SO",
                        help="TensorRT only: the plugin library to use instead of the installed one (checked against "
                             "the sha256 the engine recorded)")
    parser.add_argument("--allow-engine-code", action="store_true",
                        help="TensorRT only: deserialise plans that carry plugin code (version-compatible engines); "
                             "only for engines from builders you trust")


def _add_force(parser):
    parser.add_argument("--force", action="store_true",
                        help="replace a complete folder of the same kind at --out (a folder of another kind, or "
                             "not ours, is never replaced)")


def _add_calibration(parser):
    parser.add_argument("--calibration-images", "--calibration", dest="calibration_images", default=None, metavar="DIR",
                        help="folder of images (+ prompts.txt or <image>.txt) to calibrate on; default: a built-in "
                             "synthetic set")
    parser.add_argument("--calibration-count", type=int, default=8,
                        help="size of the built-in calibration set (default: 8)")


def _add_calibrated(parser, note: str):
    parser.add_argument("--calibrated", "--capa", dest="calibrated", default=None, metavar="DIR",
                        help=f"a `calibrate` output folder ({note})")


def _add_capa(parser):
    parser.add_argument("--prune", type=_stage, nargs="*", default=[(2, 64)], metavar="K:k",
                        help="pruning stages LAYER:KEEP (score at K-1, keep k visual tokens from layer K; KEEP a "
                             "count, 2:64, or a fraction of the image's visual tokens, 2:0.25); "
                             "several for a progressive schedule; none to disable (default: 2:64)")
    parser.add_argument("--variant", choices=VARIANTS, default="contrib",
                        help="token score: contrib (CAPA), value_norm, attention (FastV) (default: contrib)")
    parser.add_argument("--queries", choices=("text", "last"), default="text",
                        help="scoring queries: text after the image, or the last token (default: text)")
    parser.add_argument("--ffn-layers", type=_layers, default="auto",
                        help="FFN approximation layers: auto, none, or e.g. 3,4,5 (default: auto)")
    parser.add_argument("--ffn-threshold", type=float, default=0.15,
                        help="held-out relative error under which 'auto' approximates a layer (default: 0.15)")
    parser.add_argument("--ffn-range", type=_range, default=None, metavar="FIRST:LAST",
                        help="layers 'auto' may choose from (default: 1:L-2)")
    parser.add_argument("--ridge", type=float, default=1e-3, help="ridge lambda, relative (default: 1e-3)")
    parser.add_argument("--rank", type=int, default=None, help="rank of the folded FFN map (default: full)")


def _capa_config(args):
    from .config import CapaConfig

    return CapaConfig(prune=_schedule(args.prune), variant=args.variant, queries=args.queries, ffn_layers=args.ffn_layers,
                      ffn_threshold=args.ffn_threshold, ffn_range=args.ffn_range, ffn_ridge=args.ridge,
                      ffn_rank=args.rank)


def _input_sample(args):
    from .inputs import CalibrationSample, builtin_samples, check_prompt, open_image

    check_prompt(args.prompt)
    if args.image:
        return CalibrationSample(open_image(args.image, args.max_image_pixels), args.prompt, args.image)
    sample = builtin_samples(1, seed=1)[0]
    sample.question = args.prompt
    return sample


def _calibration_samples(args):
    from .inputs import builtin_samples, folder_samples

    if args.max_image_pixels < 1:
        raise CapaError(f"--max-image-pixels {args.max_image_pixels} must be >= 1")
    if args.calibration_images:
        return folder_samples(args.calibration_images, args.max_image_pixels)
    if args.calibration_count < 1:
        raise CapaError(f"--calibration-count {args.calibration_count} must be >= 1")
    return builtin_samples(args.calibration_count)


# --- commands: each calls one pipeline stage and prints its result --------------------------------
def cmd_analyze(args) -> int:
    from .analysis import AnalysisSettings, format_table
    from .pipeline import analyze

    if args.sink_ratio <= 0 or args.keep < 1:
        raise CapaError(f"--sink-ratio {args.sink_ratio} must be > 0 and --keep {args.keep} >= 1")
    settings = AnalysisSettings(sink_ratio=args.sink_ratio, keep=args.keep, ffn_threshold=args.ffn_threshold)
    start = time.perf_counter()
    out, report = analyze(args.model, args.out, sample=_input_sample(args), calibration_samples=_calibration_samples(args),
                          settings=settings, dtype=args.dtype, device=args.device, force=args.force)
    print(format_table(report))
    print(f"analysis of {args.model} written to {out}/ (report.json, sinks.png, attention_vs_contribution.png, "
          f"ffn_linearity.png) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_calibrate(args) -> int:
    from .pipeline import calibrate

    from .manifest import CALIBRATION

    check_replaceable(args.out, CALIBRATION, args.force)
    calibration = _calibration_samples(args)
    start = time.perf_counter()
    out, config, approx = calibrate(args.model, args.out, config=_capa_config(args), calibration_samples=calibration,
                                    dtype=args.dtype, device=args.device, force=args.force)
    if approx is not None:
        errors_by_layer = approx.errors()
        # text rows are measured by `analyze` (FFN linearity), not by calibration: no column of nan
        with_text = any(e.get("text") == e.get("text") and e.get("text") is not None for e in errors_by_layer.values())
        print(f"{'layer':>5} {'train err':>9} {'held-out':>9}" + (f" {'text rows':>9}" if with_text else "") +
              "  approximated")
        for layer, errors in errors_by_layer.items():
            mark = "yes" if layer in config.ffn_layers else "-"
            text = f" {errors['text']:>9.4f}" if with_text else ""
            print(f"{layer:>5} {errors['train']:>9.4f} {errors['heldout']:>9.4f}{text}  {mark}")
    print(f"CAPA config: {config.describe()}")
    print(f"calibration of {args.model} on {len(calibration)} inputs written to {out}/ in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def cmd_generate(args) -> int:
    from .pipeline import generate

    result = generate(args.model, sample=_input_sample(args), config=_capa_config(args),
                      calibration_dir=args.calibrated, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                      device=args.device)
    config = result.config
    seq, visual, kept = result.prompt_tokens, result.visual_tokens, len(result.keep_indices)
    print(f"model {args.model}: {config.describe()}")
    # keep_indices are the last stage's: name its layer (and the whole schedule when there are several)
    stages = ", ".join(f"{layer}:{keep}" for layer, keep in config.prune)
    where = (f"from layer {config.prune[-1][0]}" + (f" (stages {stages})" if len(config.prune) > 1 else "")
             if config.prune else "(no pruning)")
    print(f"prompt: {seq} tokens ({visual} visual); kept {kept} visual tokens {where}: sequence {seq} -> "
          f"{seq - visual + kept}")
    print(f"first kept visual tokens: {result.keep_indices[:16]}")
    print(f"answer ({len(result.tokens)} tokens, {result.seconds:.2f} s): {result.text!r}")
    print(f"greedy-token agreement with the unpruned model: {result.agreement_with_unpruned:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": result.tokens, "text": result.text,
                                               "keep_indices": result.keep_indices,
                                               "agreement_with_unpruned": result.agreement_with_unpruned}, indent=2))
    return 0


def cmd_export(args) -> int:
    from .export.exporter import format_summary
    from .pipeline import export

    start = time.perf_counter()
    out, manifest = export(args.model, args.out, calibration_dir=args.calibrated, prune=_schedule(args.prune),
                           dtype=args.dtype or "fp32", pruning=args.pruning, attention=args.attention,
                           attention_blocks=args.attention_blocks, device=args.device, force=args.force)
    print(format_summary(manifest))
    print(f"exported {args.model} ({manifest['dtype']}) to {out}/ in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_build(args) -> int:
    from .inputs import builtin_samples
    from .pipeline import build

    if args.device not in (None, "cpu"):
        raise CapaError(f"--device {args.device}: build calibrates, exports and computes its validation reference on "
                        f"the CPU, and the engine runs on the profile's providers (--profile edge or datacenter: "
                        f"CUDAExecutionProvider); leave --device out")
    samples = [_input_sample(args)] if args.image else None
    calibration = _calibration_samples(args) if args.calibration_images else builtin_samples(args.calibration_count)
    start = time.perf_counter()
    path, report = build(args.model, args.profile, out=args.out, calibration_dir=args.calibrated, backend=args.backend,
                         pruning=args.pruning, plugin_library=args.plugin_library, calibration_samples=calibration,
                         validation_samples=samples, max_new_tokens=args.validate_tokens, sign_key=args.sign,
                         log=logs.info, force=args.force, prune=_schedule(args.prune, allow_auto=True),
                         keep=args.keep, analysis_dir=args.analysis)
    print(report["table"])
    if report.get("signature") == "signed":
        print(f"signed with {args.sign}: {path}/manifest.sig")
    if not report["passed"]:
        print(f"engine NOT complete: validation failed; kept for inspection in {path}/", file=sys.stderr)
        return 1
    print(f"engine {path}/ built and validated in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_validate(args) -> int:
    from .pipeline import validate

    samples = [_input_sample(args)] if args.image else None
    report = validate(args.engine, args.model, samples, args.tokens, trust=args.trust, sign_key=args.sign,
                      plugin_library=args.plugin_library, allow_engine_code=args.allow_engine_code)
    print(report["table"])
    if report.get("signature"):
        print(f"signature: {report['signature']}", file=sys.stderr)
    return 0 if report["passed"] else 1


def _run_inputs(args) -> list:
    """The (image, question, source) pairs of `run`: --image/--prompt pairs (one image may serve
    several prompts, and the built-in picture none given), or a JSONL file of {"image", "prompt"}."""
    from .inputs import builtin_samples, open_image

    if args.jsonl:
        pairs = _jsonl_pairs(args.jsonl)
        return [(open_image(path, args.max_image_pixels), prompt, path) for path, prompt in pairs]
    from .inputs import check_prompt

    prompts = [check_prompt(p) for p in (args.prompt or [DEFAULT_QUESTION])]
    images = args.image or []
    if len(images) > 1 and len(images) != len(prompts):
        raise CapaError(f"{len(images)} --image and {len(prompts)} --prompt: give one image for all prompts, or one "
                        f"per prompt")
    if not images:
        return [(builtin_samples(1, seed=1)[0].image, prompt, "builtin:1") for prompt in prompts]
    opened = [open_image(path, args.max_image_pixels) for path in images]
    if len(opened) == 1:
        return [(opened[0], prompt, images[0]) for prompt in prompts]
    return [(image, prompt, path) for image, prompt, path in zip(opened, prompts, images)]


def _jsonl_pairs(path: str) -> list[tuple[str, str]]:
    """(image path, prompt) per line of a JSONL file; image paths relative to the file."""
    file = Path(path)
    if not file.is_file():
        raise CapaError(f"--jsonl {path} does not exist; give a file of lines {{\"image\": ..., \"prompt\": ...}}")
    pairs = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image, prompt = entry["image"], entry["prompt"]
            if not isinstance(image, str) or not isinstance(prompt, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CapaError(f"--jsonl {path} line {number} is not a JSON object with string fields \"image\" and "
                            f"\"prompt\"") from None
        if not prompt.strip():
            raise CapaError(f"--jsonl {path} line {number}: the prompt is empty; give a question about the image")
        pairs.append((str(file.parent / image), prompt))
    if not pairs:
        raise CapaError(f"--jsonl {path} holds no lines")
    return pairs


def cmd_run(args) -> int:
    from .config import describe_keep
    from .runtime import CapaEngine

    if args.max_new_tokens < 1:
        raise CapaError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise CapaError(f"--threads {args.threads} must be >= 1")
    inputs = _run_inputs(args)
    with CapaEngine(args.engine, verify=not args.no_verify, trust=args.trust, plugin_library=args.plugin_library,
                    allow_engine_code=args.allow_engine_code, provider=args.provider, threads=args.threads) as engine:
        header = (f"engine {args.engine}: {engine.manifest['backend']} {engine.manifest['dtype']}, "
                  f"keep {describe_keep(engine.manifest['k']) if engine.manifest['k'] else 'all visual tokens'}")
        single = len(inputs) == 1 and not args.json
        if len(inputs) <= engine.max_batch:  # else the batch is refused in one line, with nothing before it
            print(header, file=sys.stderr)
        stream = (lambda text: print(text, end="", flush=True)) if single else None
        results = engine.generate_batch([i for i, _, _ in inputs], [q for _, q, _ in inputs], args.max_new_tokens,
                                        stream=stream)
    if single:
        print()
    for (_, question, source), result in zip(inputs, results):
        if args.json:
            print(json.dumps({"image": source, "prompt": question, "answer": result.text, "tokens": result.tokens,
                              "keep_indices": result.keep_indices, "prompt_tokens": result.prompt_tokens,
                              "timings_ms": {k: round(v * 1e3, 3) for k, v in result.timings.items()}}))
        elif not single:
            print(f"{question!r} ({source}): {result.text}")
    t = results[0].timings
    print(f"{len(results)} prompt(s), kept {len(results[0].keep_indices)} visual tokens each | vision "
          f"{t['vision'] * 1e3:.1f} ms, prefill {t['prefill'] * 1e3:.1f} ms, time to first token "
          f"{t['time_to_first_token'] * 1e3:.1f} ms, decode {t['decode_per_token'] * 1e3:.1f} ms/token "
          f"({len(results[0].tokens)} tokens)", file=sys.stderr)
    return 0


# --- eval ---------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .evaluate import builtin_questions, evaluate, folder_questions, format_table

    if args.max_image_pixels < 1:
        raise CapaError(f"--max-image-pixels {args.max_image_pixels} must be >= 1")
    if args.engine is None and args.model is None:
        raise CapaError("give an engine folder, or --model (e.g. tiny-llava) to evaluate the CapaModel")
    if args.sweep:
        from .evaluate import parse_sweep_keeps, parse_sweep_variants

        if args.engine is not None:
            raise CapaError("--sweep runs the CapaModel at each setting: give --model, not an engine folder")
        keeps, variants = parse_sweep_keeps(args.sweep_keeps), parse_sweep_variants(args.sweep_variants)
    if args.data:
        questions, data = folder_questions(args.data, args.max_image_pixels), args.data
    else:
        questions, data = builtin_questions(args.builtin), f"built-in Shapes-VQA test split, {args.builtin} questions"
    if args.sweep:
        from .evaluate import format_sweep_table, sweep

        config = _capa_config(args)
        layer = config.prune[0][0] if config.prune else 2
        summary = sweep(questions, args.model, layer=layer, keeps=keeps, variants=variants,
                        with_ffn=not args.sweep_no_ffn, calibration_dir=args.calibrated,
                        max_new_tokens=args.max_new_tokens, out=args.out, dtype=args.dtype, device=args.device,
                        progress=not args.no_progress, data=data)
        print(format_sweep_table(summary))
        print(f"sweep: {args.out}/sweep.json, plot: {args.out}/sweep.png", file=sys.stderr)
        return 0
    summary = evaluate(questions, model_name=args.model, engine_dir=args.engine,
                       config=None if args.engine else _capa_config(args), calibration_dir=args.calibrated,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=args.out,
                       trust=args.trust, provider=args.provider, threads=args.threads, dtype=args.dtype,
                       device=args.device, progress=not args.no_progress, data=data)
    print(format_table(summary))
    print(f"predictions: {args.out}/predictions.jsonl, summary: {args.out}/summary.json", file=sys.stderr)
    return 0


def cmd_keygen(args) -> int:
    from .signing import generate_keypair

    private, public = generate_keypair(args.out)
    print(f"private key {private} (mode 0600: keep it secret; give it to build --sign)")
    print(f"public key  {public} (give it to whoever runs your engines: run --trust)")
    return 0


def cmd_bench(args) -> int:
    from .bench import Settings, format_table, run_benchmark, save, update_benchmarks

    chosen = {"size": args.size, "dtype": args.dtype, "device": args.device, "batch": args.batch,
              "visual": args.visual, "keep": args.keep, "text_tokens": args.text_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
              "calibration_count": args.calibration_count, "validate_tokens": args.validate_tokens,
              "build_jobs": args.build_jobs, "profile": not args.no_profile, "reuse": args.reuse, "work": args.work or ""}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    if args.peers:
        chosen["peers"] = args.peers
    if args.no_engine:
        from .bench import ENGINE_PEERS, PEERS

        chosen["peers"] = [p for p in chosen.get("peers", PEERS) if p not in ENGINE_PEERS]
    settings = Settings.for_smoke(**chosen) if args.smoke else Settings(**chosen)
    if args.update and Path(args.update).suffix != ".md":
        raise CapaError(f"--update {args.update} must be a Markdown file (e.g. BENCHMARKS.md)")
    # checked before the run (which takes minutes): a folder gets the default name, else a .json path
    folder = Path(args.out) if args.out and Path(args.out).is_dir() else None
    if args.out and folder is None and Path(args.out).suffix != ".json":
        raise CapaError(f"--out {args.out} must be a .json path or an existing folder (the .png and .md go beside it)")
    report = run_benchmark(settings, log=lambda text: print(text, file=sys.stderr))
    s = report["settings"]
    name = f"{report['date'][:10]}-{s['size']}-{s['dtype']}-b{s['batch']}.json"
    default = (Path("out/bench") if s["smoke"] else Path("bench/results")) / name
    out = save(report, folder / name if folder is not None else (args.out or default))
    print(format_table(report))
    if args.update:
        update_benchmarks(args.update, report, out)
    for peer, reason in report["skipped"].items():
        print(f"{peer} skipped: {reason}")
    print(f"{report['machine']['cpu']}: results in {out} (+ .png, .md)"
          + (f"; section of {args.update} updated" if args.update else ""))
    return 0 if not report["failed"] and all(c["passed"] for c in report["checks"]) else 1


def _serving_options(args) -> dict:
    return dict(instances=args.instances, max_batch=args.max_batch, queue_delay_us=args.max_queue_delay_us,
                threads=args.threads, trust=args.trust, default_max_new_tokens=args.max_new_tokens, stream=args.stream)


def cmd_triton_repo(args) -> int:
    from .serving.triton_repo import MODEL_NAME, TRITON_VERSION, write_repository

    out = write_repository(args.engine, args.out, copy=args.copy, **_serving_options(args))
    print(f"model repository {out} (model '{MODEL_NAME}', tested with Triton {TRITON_VERSION}): "
          f"tritonserver --model-repository {Path(out).resolve()}, or capa-export serve --repository {out}")
    return 0


def cmd_serve(args) -> int:
    import tempfile

    from .serving.serve import serve
    from .serving.triton_repo import write_repository

    announce = lambda line: print(f"capa-export serve: {line}", file=sys.stderr, flush=True)  # noqa: E731
    server = dict(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                  ready_timeout_s=args.ready_timeout, announce=announce)
    if args.repository:
        if args.engine:
            raise CapaError("give an engine folder or --repository, not both")
        return serve(Path(args.repository), **server)
    if not args.engine:
        raise CapaError("give the engine folder to serve (or --repository DIR written by capa-export triton-repo)")
    with tempfile.TemporaryDirectory(prefix="capa-serve-") as tmp:
        repository = write_repository(args.engine, Path(tmp) / "repository", **_serving_options(args))
        return serve(repository, **server)


# --- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import backends

    parser = argparse.ArgumentParser(prog="capa-export", description=(
        "CAPA for vision-language models: analyse, calibrate, export, build, validate and run engines "
        "with contribution-aware visual-token pruning and FFN approximation."))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"capa-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="sinks, attention vs contribution, FFN linearity; JSON report + plots",
                       description="Analyse a model on one image + prompt: visual attention sinks per layer "
                                   "labelled Probability Dump / Structural Anchor, attention-vs-contribution "
                                   "rank correlation, FFN linearity of visual vs text rows, suggested settings.")
    _add_model(p)
    _add_input(p)
    _add_calibration(p)
    p.add_argument("--sink-ratio", type=float, default=5.0,
                   help="a sink receives more than this times the mean visual attention (default: 5)")
    p.add_argument("--keep", type=int, default=64,
                   help="token budget: a sink within the top-KEEP by contribution is an anchor (default: 64)")
    p.add_argument("--ffn-threshold", type=float, default=0.15,
                   help="relative error under which a layer's FFN counts as linear (default: 0.15)")
    p.add_argument("--out", default="out/analysis", help="output folder (default: out/analysis)")
    _add_force(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("calibrate", help="fit the FFN approximation and write a CAPA config",
                       description="Fit per-layer affine maps of the FFN on visual rows (ridge, float64) from "
                                   "calibration inputs, select layers, and write capa_config.json, "
                                   "ffn_approx.safetensors, ffn_approx.json and calibration.json.")
    _add_model(p)
    _add_calibration(p)
    _add_pixel_cap(p)
    _add_capa(p)
    p.add_argument("--out", default="out/calibration", help="output folder (default: out/calibration)")
    _add_force(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="run the CAPA model in PyTorch on one image + prompt",
                       description="Greedy generation with the CapaModel (the PyTorch reference), printing "
                                   "which visual tokens were kept and the agreement with the unpruned model.")
    _add_model(p)
    _add_input(p)
    _add_capa(p)
    _add_calibrated(p, "overrides the pruning/FFN options")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export ONNX graphs (vision, embed, prefill with pruning, decode)",
                       description="Export the CAPA model to vision.onnx, embed.onnx, prefill.onnx (pruning as "
                                   "one CapaContribTopK node with its ONNX local function, or inlined with "
                                   "--pruning inline; approximated "
                                   "FFNs folded to MatMul + Add) and decode.onnx, sharing one weights.data.")
    _add_model(p, dtype_help="dtype of the exported graphs: the engine precision (default: fp32)")
    _add_calibrated(p, "default: calibrate now")
    p.add_argument("--prune", type=_stage, nargs="*", default=None, metavar="K:k",
                   help="override the pruning schedule (a count is fixed in the exported graph; a fraction "
                        "is computed from each image's visual tokens inside it)")
    p.add_argument("--pruning", type=_lowering, default="function",
                   help="function: one CapaContribTopK node with its ONNX local function (TensorRT runs its "
                        "plugin, other runtimes the standard-op body); inline: the body inlined, for runtimes "
                        "without local functions (default: function)")
    p.add_argument("--attention", choices=("fused", "explicit"), default="fused",
                   help="fused: each layer's attention as one ONNX Attention op (opset 23; ONNX Runtime >= 1.23, "
                        "TensorRT >= 10.14); explicit: MatMul/Softmax/MatMul (default: fused)")
    p.add_argument("--attention-blocks", type=int, default=1, metavar="N",
                   help="fused attention of the layers before the scoring layer as N ops over blocks of query rows, each "
                        "with the keys up to its last row: the same result, about (N+1)/2N of the work where the "
                        "kernel computes masked products (ONNX Runtime CPU; the cpu profile uses 8) (default: 1)")
    p.add_argument("--out", default="out/onnx", help="output folder (default: out/onnx)")
    _add_force(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="calibrate + export + build an engine + validate, in one command",
                       description="Model -> CAPA (calibrating unless --calibrated) -> ONNX -> engine (ONNX Runtime, "
                                   "or TensorRT where installed) -> Polygraphy validation. The engine folder is "
                                   "marked complete only when validation passes.")
    _add_model(p, dtype_help=None)
    _add_calibration(p)
    _add_pixel_cap(p)
    p.add_argument("--profile", default="cpu", help="build profile: cpu, edge, datacenter, or a TOML file "
                                                    "(default: cpu)")
    _add_calibrated(p, "default: calibrate now")
    p.add_argument("--backend", choices=("auto", *backends.names()), default=None,
                   help="override the profile's backend")
    p.add_argument("--pruning", type=_lowering, default=None,
                   help="override the profile's lowering: function or inline (see export --help)")
    p.add_argument("--plugin-library", default=None, help="TensorRT plugin library (TensorRT backend only)")
    p.add_argument("--prune", type=_stage, nargs="*", default=None, metavar="K:k",
                   help="pruning stages LAYER:KEEP over the profile's and the calibration's (KEEP a count, 2:64, or "
                        "a fraction of each image's visual tokens, 2:0.25), none, or auto: analyze's suggested layer "
                        "and FFN range (from --analysis DIR, else analysed now)")
    p.add_argument("--keep", type=_keep, default=None, metavar="N",
                   help="visual tokens kept by the single pruning stage, a count or a fraction (at layer 2, or the "
                        "suggested layer with --prune auto)")
    p.add_argument("--analysis", default=None, metavar="DIR",
                   help="an `analyze` folder of this model whose suggestion --prune auto takes")
    p.add_argument("--image", default=None, help="validate on this image too (default: a built-in picture)")
    p.add_argument("--prompt", default=DEFAULT_QUESTION, help="question for the validation image")
    p.add_argument("--validate-tokens", type=int, default=8, help="greedy tokens compared end to end (default: 8)")
    p.add_argument("--sign", default=None, metavar="KEY",
                   help="PEM Ed25519 private key (capa-export keygen): sign the validated engine (manifest.sig)")
    p.add_argument("--out", default=None, help="engine folder (default: engines/<model>-<profile>)")
    _add_force(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("validate", help="compare an engine with the PyTorch CapaModel (Polygraphy)",
                       description="Graph-by-graph Polygraphy comparison and end-to-end greedy-token agreement; "
                                   "writes revalidation.json beside the build's validation.json, marks the engine "
                                   "complete or not; exit 1 on failure.")
    p.add_argument("engine", help="engine folder")
    p.add_argument("--model", default=None,
                   help="model to compare with: needed unless the manifest names an embedded model (a path or hub id "
                        "read from an engine folder is never loaded)")
    _add_input(p)
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens compared end to end (default: 8)")
    _add_trust(p)
    p.add_argument("--sign", default=None, metavar="KEY",
                   help="PEM Ed25519 private key: sign the engine again once it passed (validation rewrites "
                        "manifest.json, so an earlier signature no longer holds and is removed)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="generate an answer with a built engine",
                       description="Preprocess, vision, embeddings, prefill with pruning, decode with the KV "
                                   "cache; streams tokens and prints timings.")
    p.add_argument("engine", help="engine folder")
    p.add_argument("--image", action="append", default=None,
                   help="image file; repeat with --prompt for a batch (one image per prompt, or one for all) "
                        "(default: a built-in synthetic picture)")
    p.add_argument("--prompt", action="append", default=None,
                   help="question about the image; repeat for several answers in one batch")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help="a batch from a file of lines {\"image\": path relative to the file, \"prompt\": ...}")
    _add_pixel_cap(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--provider", default=None,
                   help="ONNX Runtime execution provider, one the engine was built for (default: the engine's first "
                        "available one)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--json", action="store_true", help="print one JSON line per answer (no streaming)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip hashing the engine files (names, links, sizes and the one-to-one match with the "
                        "manifest are still checked; ignored with --trust)")
    _add_trust(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="exact-match accuracy on a labelled set (a data folder or the built-in task)",
                       description="Greedy answers on labelled questions, normalised as VQA evaluation does (case, "
                                   "punctuation, articles, number words), scored by exact match: an engine beside "
                                   "the CapaModel it was built from, or a model with and without CAPA. Data: a "
                                   "folder with data.jsonl (lines {\"image\": path in the folder, \"question\", "
                                   "\"answer\"}) and its images, or the built-in Shapes-VQA test split. Writes "
                                   "predictions.jsonl and summary.json; prints a table.")
    p.add_argument("engine", nargs="?", default=None, help="an engine folder (`build`); or give --model")
    p.add_argument("--model", default=None,
                   help="the model to evaluate (with no engine), or the reference of an engine built from a model "
                        "that is not embedded; e.g. tiny-llava (the embedded model trained on Shapes-VQA)")
    p.add_argument("--dtype", choices=FLOAT_TYPE_NAMES, default=None, help="weights dtype of --model without an engine")
    p.add_argument("--device", default=None, help="torch device of the model (default: cpu)")
    _add_calibrated(p, "its CAPA config and FFN maps, instead of --prune and the other CAPA options")
    _add_capa(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, metavar="DIR", help="a data folder: data.jsonl + images")
    source.add_argument("--builtin", type=int, default=200, metavar="N",
                        help="N questions of the built-in Shapes-VQA test split, one per image (default: 200)")
    _add_pixel_cap(p)
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer at most (default: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per engine batch (default: 8)")
    p.add_argument("--provider", default=None, help="ONNX Runtime execution provider of the engine")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--trust", default=None, metavar="PUBKEY",
                   help="PEM public key: the engine's signature (manifest.sig) must verify with it")
    from .evaluate import SWEEP_KEEPS, SWEEP_VARIANTS

    p.add_argument("--sweep", action="store_true",
                   help="accuracy against visual tokens kept after the --prune layer (default 2) for each ranking "
                        "variant, without and with the FFN approximation (maps from --calibrated, or fitted on "
                        "Shapes-VQA training images), beside the unpruned model; writes sweep.json and sweep.png")
    p.add_argument("--sweep-keeps", default=",".join(map(str, SWEEP_KEEPS)), metavar="K,K,...",
                   help=f"token counts of the sweep (default: {','.join(map(str, SWEEP_KEEPS))})")
    p.add_argument("--sweep-variants", default=",".join(SWEEP_VARIANTS), metavar="V,V,...",
                   help=f"rankings of the sweep (default: {','.join(SWEEP_VARIANTS)}; random: a fixed seed)")
    p.add_argument("--sweep-no-ffn", action="store_true", help="sweep without the FFN-approximation runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="out/eval",
                   help="folder for predictions.jsonl and summary.json, or sweep.json and sweep.png (default: out/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair to sign engines with",
                       description="Write capa-signing-key.pem (private, mode 0600) and capa-signing-key.pub.pem "
                                   "into --out; existing files are never replaced. OpenSSL makes the same keys: "
                                   "openssl genpkey -algorithm ed25519 -out key.pem; "
                                   "openssl pkey -in key.pem -pubout -out key.pub.pem")
    p.add_argument("--out", default=".", help="directory for the two key files (default: .)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("bench", help="time CAPA engines against HF, FastV, the CapaModel and ONNX Runtime GenAI",
                       description="One run, same inputs, one machine: HF SDPA unpruned, FastV and the CapaModel "
                                   "eager, the ONNX Runtime engines (unpruned, CAPA, CAPA + affine FFN; built and "
                                   "validated by `build`), ONNX Runtime GenAI as the decode peer. Vision, prefill, "
                                   "time to first token, decode per token, peak RSS (of every peer and of "
                                   "calibrate/export/build), each time against its FLOP floor measured in the same "
                                   "run; JSON + PNG + Markdown. --smoke runs the path on tiny-llava-random.")
    from .bench import PEERS, sizes

    p.add_argument("--size", choices=tuple(sizes()), default=None,
                   help="an embedded model, or a family's real size with random weights (default: mid)")
    p.add_argument("--visual", type=int, nargs="+", default=None, metavar="N",
                   help="visual tokens in the prompt, a multiple of one picture's (default: one picture, and five "
                        "when it is LLaVA-1.5's 576: 576 2880)")
    p.add_argument("--keep", type=int, default=None, help="visual tokens kept after layer 2 (default: 64)")
    p.add_argument("--dtype", choices=FLOAT_TYPE_NAMES, default=None, help="dtype (default: fp32)")
    p.add_argument("--batch", type=int, default=None, help="prompts per run, all the same (default: 1)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens after the image (default: 46)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per peer (default: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: every core)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--peers", nargs="+", choices=tuple(PEERS), default=None, help="peers to run (default: all)")
    p.add_argument("--no-engine", action="store_true", help="skip the ONNX Runtime engines (and their builds)")
    p.add_argument("--no-profile", action="store_true", help="skip the ONNX Runtime profile of the CAPA engines")
    p.add_argument("--calibration-count", type=int, default=None, help="built-in calibration inputs (default: 8)")
    p.add_argument("--validate-tokens", type=int, default=None, help="tokens `build` validates (default: 8)")
    p.add_argument("--build-jobs", type=int, default=None, help="export/build/GenAI steps run at once (default: 1)")
    p.add_argument("--work", default=None, help="work folder (default: out/bench/<size>-<dtype>)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the work folder's model, calibrations, engines and GenAI model when their settings "
                        "match (their build-memory figures are then the earlier run's)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny-llava-random, 576 visual tokens, 2 runs: checks the path, not the speed")
    p.add_argument("--out", default=None,
                   help="JSON path, or a folder for the default name (default: "
                        "bench/results/<date>-<size>-<dtype>-b<batch>.json; out/bench/ for --smoke)")
    p.add_argument("--update", default=None, metavar="BENCHMARKS.md",
                   help="also write the run's table into this Markdown file (its section for the size)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository for an engine",
                       description="A Python-backend model ('capa') that runs the engine with CapaEngine: "
                                   "config.pbtxt (inputs image/prompt/max_new_tokens, outputs text/tokens/"
                                   "keep_indices/prompt_tokens/timings/batch_size, dynamic batching, instances) and model.py. "
                                   "The engine is checked now and when Triton loads it.")
    p.add_argument("engine", help="engine folder")
    p.add_argument("out", help="new (or empty) folder for the model repository")
    p.add_argument("--copy", action="store_true",
                   help="copy the engine into the repository (default: reference it by absolute path)")
    _add_serving(p)
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("serve", help="serve an engine with Triton Inference Server (KServe v2 HTTP/gRPC)",
                       description="Write a model repository for the engine (as triton-repo) and run the "
                                   "tritonserver of nvidia-pytriton on it until SIGINT/SIGTERM; binds to "
                                   "127.0.0.1 unless --host says otherwise.")
    p.add_argument("engine", nargs="?", default=None, help="engine folder")
    p.add_argument("--repository", default=None, metavar="DIR",
                   help="serve a model repository written by triton-repo instead of an engine folder (its "
                        "config.pbtxt then sets instances, batching and the rest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port; 0: none (default: 8002)")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for readiness (default: 300)")
    _add_serving(p)
    p.set_defaults(func=cmd_serve)
    for command in sub.choices.values():
        _add_log_level(command)
    return parser


def _add_log_level(parser):
    from .logs import DEFAULT_LEVEL, LEVELS

    group = parser.add_argument_group("output")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--log-level", choices=tuple(LEVELS), default=DEFAULT_LEVEL,
                        help=f"status lines and progress at info; libraries' warnings only at debug (default: "
                             f"{DEFAULT_LEVEL})")
    choice.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning",
                        help="results and errors only (--log-level warning)")
    choice.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                        help="also the libraries' warnings and Polygraphy's own lines (--log-level debug)")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import configure

    configure(args.log_level)
    try:
        return args.func(args)
    except CapaError as exc:
        print(f"capa-export {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capa-export {args.command}: interrupted; no output was completed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
