"""Task accuracy: exact match of greedy answers on a labelled set, for a model with or without
CAPA and for a built engine beside the CapaModel it was built from.

    questions   a user's folder (images + data.jsonl, see `shapes_vqa.read_folder`) or the built-in
                Shapes-VQA test split (`builtin_questions`)
    runs        model:  "capa" (the configured pruning) and "unpruned" (no pruning, no FFN map)
                engine: "engine" (the engine folder itself), "capa" (the CapaModel rebuilt from the
                        engine's calibration/, fp32) and "unpruned"
    scoring     an answer is the greedy text before </s>; it is right when `normalize_answer` of it
                equals that of the labelled answer (VQA-style: case, punctuation, articles, number
                words); agreement of two runs is the share of questions they answer identically
                (after the same normalisation)

Writes, when given a folder: predictions.jsonl (one line per question, every run's answer) and
summary.json (per run: exact match, per question type; agreements).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import CapaConfig
from .data import shapes_vqa
from .data.shapes_vqa import normalize_answer
from .errors import CapaError
from .folders import MAX_IMAGE_PIXELS

#: the built-in task's answers are at most 9 tokens and </s>; a user's may be longer
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass
class LabelledQuestion:
    image: object          # a PIL image
    question: str
    answer: str
    source: str            # where the image came from (a path, or shapes-vqa:<split>:<index>)
    type: str | None = None


def builtin_questions(count: int, seed: int = 0, split: str = "test") -> list[LabelledQuestion]:
    """`count` questions of the built-in Shapes-VQA task, one per image, from a held-out split."""
    if count < 1:
        raise CapaError(f"--builtin {count} must be >= 1 (the number of built-in test questions)")
    samples = shapes_vqa.make_split(split, count, seed)
    return [LabelledQuestion(s.image, s.questions[0].text, s.questions[0].answer, f"shapes-vqa:{split}:{s.index}",
                             s.questions[0].type) for s in samples]


def folder_questions(folder: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> list[LabelledQuestion]:
    """The questions of a data folder (untrusted: see `shapes_vqa.read_folder`); each image is
    opened once, its header's pixel count checked before decoding."""
    from .inputs import open_image

    images = {}
    questions = []
    for record in shapes_vqa.read_folder(folder):
        if record.image not in images:
            images[record.image] = open_image(record.image, max_pixels)
        questions.append(LabelledQuestion(images[record.image], record.question, record.answer, str(record.image),
                                          record.type))
    return questions


def is_correct(predicted: str, answer: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(answer)


def _text_before_eos(tokenizer, tokens: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def model_answers(capa, processor, questions: list[LabelledQuestion], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  progress: bool = True, desc: str = "model") -> list[str]:
    """Greedy answers of a CapaModel, one question at a time (no padding enters a forward pass)."""
    from tqdm.auto import tqdm

    from .inputs import CalibrationSample, encode
    from .models import adapter_for

    adapter = adapter_for(capa.model)
    tokenizer = processor.tokenizer
    answers = []
    for q in tqdm(questions, desc=desc, unit="question", disable=not progress):
        batch = encode(adapter, processor, CalibrationSample(q.image, q.question, q.source))
        tokens, _ = capa.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        answers.append(_text_before_eos(tokenizer, tokens[0].tolist()))
    return answers


def engine_answers(engine, questions: list[LabelledQuestion], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy answers of a built engine, in batches of at most the engine's largest batch."""
    from tqdm.auto import tqdm

    size = max(1, min(batch_size, engine.max_batch))
    answers = []
    with tqdm(total=len(questions), desc="engine", unit="question", disable=not progress) as bar:
        for start in range(0, len(questions), size):
            chunk = questions[start:start + size]
            results = engine.generate_batch([q.image for q in chunk], [q.question for q in chunk], max_new_tokens)
            answers += [r.text for r in results]
            bar.update(len(chunk))
    return answers


def score(questions: list[LabelledQuestion], answers: list[str]) -> dict:
    """Exact match overall and per question type (where the data records types)."""
    correct = [is_correct(a, q.answer) for q, a in zip(questions, answers)]
    by_type: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        if q.type:
            by_type.setdefault(q.type, []).append(ok)
    return {"exact_match": sum(correct) / len(correct), "correct": sum(correct), "questions": len(correct),
            "per_type": {t: {"exact_match": sum(v) / len(v), "questions": len(v)} for t, v in sorted(by_type.items())}}


def agreement(first: list[str], second: list[str]) -> float:
    """Share of questions two runs answer the same (after normalisation)."""
    return sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(first, second)) / len(first)


def evaluate(questions: list[LabelledQuestion], *, model_name: str | None = None, engine_dir: str | Path | None = None,
             config: CapaConfig | None = None, calibration_dir: str | Path | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8, compare_unpruned: bool = True,
             out: str | Path | None = None, trust=None, provider: str | None = None, threads: int | None = None,
             dtype=None, device=None, progress: bool = True, data: str = "") -> dict:
    """Exact-match accuracy of greedy answers on `questions`.

    With `engine_dir`: the engine's answers, and (fp32) the CapaModel's rebuilt from the engine's
    own calibration with `model_name` or the embedded model its manifest names; with `model_name`
    only: the CapaModel with `config` or the `calibration_dir` folder. Plus the unpruned model on
    the same questions (compare_unpruned). Returns the summary (also written to out/summary.json,
    with out/predictions.jsonl)."""
    from .method.capa_model import apply_capa
    from .models import adapter_for, load_model
    from .pipeline import check_engine_model, load_calibration, reference_model

    if not questions:
        raise CapaError("no questions to evaluate; give a data folder with at least one line, or --builtin N >= 1")
    if max_new_tokens < 1:
        raise CapaError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise CapaError(f"--batch-size {batch_size} must be >= 1")
    if engine_dir is None and model_name is None:
        raise CapaError("nothing to evaluate: give an engine folder or --model")
    answers: dict[str, list[str]] = {}
    settings: dict[str, str] = {}
    seconds: dict[str, float] = {}
    if engine_dir is not None:
        from .folders import confined_directory
        from .runtime import CapaEngine

        engine_dir = Path(engine_dir)
        with CapaEngine(engine_dir, trust=trust, provider=provider, threads=threads) as engine:
            model_name = reference_model(engine.manifest, model_name, engine_dir)
            model, processor = load_model(model_name, "fp32", device)
            check_engine_model(engine.manifest, adapter_for(model), engine_dir)
            config, approx = load_calibration(model, confined_directory(engine_dir, "calibration",
                                                                        source=str(engine_dir)))
            settings["engine"] = f"{engine.manifest['backend']} {engine.manifest['dtype']}, {config.describe()}"
            start = time.perf_counter()
            answers["engine"] = engine_answers(engine, questions, max_new_tokens, batch_size, progress)
            seconds["engine"] = time.perf_counter() - start
    else:
        model, processor = load_model(model_name, dtype, device)
        if calibration_dir is not None:
            config, approx = load_calibration(model, calibration_dir)
        else:
            config, approx = config or CapaConfig(), None
            if config.ffn_layers == "auto":  # nothing fitted here: no FFN approximation
                config = CapaConfig(**{**config.to_dict(), "ffn_layers": []})
    runs = [("capa", config, approx)]
    if compare_unpruned and (config.prune or config.ffn_layers):
        runs.append(("unpruned", CapaConfig(prune=[]), None))
    for name, run_config, run_approx in runs:
        settings[name] = f"{model_name}: {run_config.describe()}"
        start = time.perf_counter()
        answers[name] = model_answers(apply_capa(model, run_config, run_approx), processor, questions,
                                      max_new_tokens, progress, desc=name)
        seconds[name] = time.perf_counter() - start
    names = list(answers)
    summary = {
        "data": data, "questions": len(questions), "max_new_tokens": max_new_tokens, "model": model_name,
        "engine": str(engine_dir) if engine_dir is not None else None,
        "runs": {n: {"setting": settings[n], **score(questions, answers[n]), "seconds": round(seconds[n], 2)}
                 for n in names},
        "agreement": {f"{a} vs {b}": agreement(answers[a], answers[b])
                      for i, a in enumerate(names) for b in names[i + 1:]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if out is not None:
        _write(Path(out), questions, answers, summary)
    return {**summary, "answers": answers}


def _write(out: Path, questions: list[LabelledQuestion], answers: dict[str, list[str]], summary: dict) -> None:
    from .folders import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, q in enumerate(questions):
        row = {"image": q.source, "question": q.question, "answer": q.answer, "type": q.type}
        row.update({f"predicted_{n}": a[i] for n, a in answers.items()})
        row.update({f"correct_{n}": is_correct(a[i], q.answer) for n, a in answers.items()})
        lines.append(json.dumps(row))
    atomic_write_bytes(out / "predictions.jsonl", ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "summary.json", summary)


def format_table(summary: dict) -> str:
    """The terminal table: one row per run (exact match overall and per question type), then the
    agreements between runs."""
    types = sorted({t for run in summary["runs"].values() for t in run["per_type"]})
    header = f"{'run':<10} {'exact match':>12}  " + " ".join(f"{t:>8}" for t in types) + "  setting"
    lines = [f"{summary['questions']} questions ({summary['data']}), greedy, at most {summary['max_new_tokens']} "
             f"new tokens", header, "-" * len(header)]
    for name, run in summary["runs"].items():
        cells = " ".join(f"{run['per_type'][t]['exact_match']:>8.1%}" if t in run["per_type"] else f"{'-':>8}"
                         for t in types)
        lines.append(f"{name:<10} {run['exact_match']:>7.1%} {run['correct']:>4}  {cells}  {run['setting']}")
    for pair, value in summary["agreement"].items():
        lines.append(f"answers agree, {pair}: {value:.1%}")
    return "\n".join(lines)


# --- the sweep: accuracy against tokens kept ------------------------------------------------------
SWEEP_KEEPS = (16, 32, 64, 128, 192, 576)
SWEEP_VARIANTS = ("contrib", "value_norm", "attention", "random")
#: how many Shapes-VQA training images fit the FFN maps of the sweep's "with FFN" runs
SWEEP_CALIBRATION_IMAGES = 8


class RandomSelection:
    """The `random` baseline of the sweep: k visual tokens drawn uniformly, ascending, from a
    generator seeded once per run (so every run draws the same sequence of subsets)."""

    def __init__(self, seed: int):
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, probs, values, o_weight, keep):
        import torch

        batch, n = probs.shape[0], probs.shape[-1]
        drawn = torch.stack([torch.randperm(n, generator=self.generator)[:keep] for _ in range(batch)])
        return drawn.sort(dim=1).values.to(probs.device)


def parse_sweep_keeps(text: str) -> tuple[int, ...]:
    try:
        keeps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise CapaError(f"--sweep-keeps {text!r} must be comma-separated token counts, e.g. 16,32,64,128") from None
    if not keeps or keeps[0] < 1:
        raise CapaError(f"--sweep-keeps {text!r} must name token counts >= 1")
    return keeps


def parse_sweep_variants(text: str) -> tuple[str, ...]:
    variants = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [v for v in variants if v not in SWEEP_VARIANTS]
    if not variants or unknown:
        raise CapaError(f"--sweep-variants {text!r}: expected a comma-separated subset of {','.join(SWEEP_VARIANTS)}")
    return variants


def sweep(questions: list[LabelledQuestion], model_name: str, *, layer: int = 2, keeps=SWEEP_KEEPS,
          variants=SWEEP_VARIANTS, with_ffn: bool = True, calibration_dir: str | Path | None = None,
          seed: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, out: str | Path | None = None,
          dtype=None, device=None, progress: bool = True, data: str = "") -> dict:
    """Exact match against the number of visual tokens kept after `layer`, for each ranking
    variant, without and (`with_ffn`) with the FFN approximation, beside the unpruned model on the
    same questions; each run's agreement with the unpruned answers. The FFN maps come from
    `calibration_dir`, or are fitted now ("auto" layers) on Shapes-VQA training images (not the
    test split). Writes sweep.json and sweep.png to `out`."""
    import torch
    from tqdm.auto import tqdm

    from .inputs import CalibrationSample
    from .method.capa_model import apply_capa
    from .models import adapter_for, load_model
    from .pipeline import fit_calibration, load_calibration

    if not questions:
        raise CapaError("no questions to evaluate; give a data folder with at least one line, or --builtin N >= 1")
    keeps = tuple(sorted(set(keeps)))
    model, processor = load_model(model_name, dtype, device)
    adapter = adapter_for(model)
    CapaConfig(prune=[(layer, keeps[0])]).check_for_model(adapter.num_layers)
    unpruned_capa = apply_capa(model, CapaConfig(prune=[]))
    groups = _sweep_groups(unpruned_capa, processor, questions)
    # the fewest candidates any question's image gives bounds every keep (refused before the runs)
    fewest = min(unpruned_capa.visual_slots(batch["input_ids"], batch).shape[1] for _, batch, _ in groups)
    if keeps[-1] > fewest:
        raise CapaError(f"--sweep-keeps {keeps[-1]} is above the {fewest} visual tokens "
                        f"{'an image' if len(questions) == 1 else 'the smallest image'} of this set gives "
                        f"{model_name}; keep at most {fewest}")
    ffn_layers, approx, ffn_note = [], None, None
    if with_ffn:
        if calibration_dir is not None:
            calibrated, approx = load_calibration(model, calibration_dir)
        else:
            samples = [CalibrationSample(s.image, s.questions[0].text, f"shapes-vqa:train:{s.index}")
                       for s in shapes_vqa.make_split("train", SWEEP_CALIBRATION_IMAGES, seed)]
            calibrated, approx = fit_calibration(model, processor, CapaConfig(prune=[], ffn_layers="auto"), samples,
                                                 progress=False)
        ffn_layers = list(calibrated.ffn_layers)
        if not ffn_layers:
            approx, ffn_note = None, "no layer's FFN fit was below the threshold: no 'with FFN' runs"
    runs = [("unpruned", None, False)]
    for ffn in ([False, True] if ffn_layers else [False]):
        runs += [(variant, keep, ffn) for variant in variants for keep in keeps]
    results, unpruned_answers = [], None
    bar = tqdm(total=len(runs) * len(questions), desc="sweep", unit="answer", disable=not progress)
    for variant, keep, ffn in runs:
        config = CapaConfig(prune=[] if keep is None else [(layer, keep)],
                            variant=variant if variant in ("value_norm", "attention") else "contrib",
                            ffn_layers=ffn_layers if ffn else [])
        capa = apply_capa(model, config, approx if ffn else None)
        if variant == "random":
            capa.select_tokens = RandomSelection(seed)
        start = time.perf_counter()
        bar.set_postfix_str(f"{variant} keep {keep if keep is not None else 'all'}{' +FFN' if ffn else ''}")
        answers = [""] * len(questions)
        for indices, batch, features in groups:
            with torch.inference_mode():
                tokens, _ = capa.generate(**batch, image_features=features, max_new_tokens=max_new_tokens,
                                          eos_token_id=processor.tokenizer.eos_token_id)
            for i, row in zip(indices, tokens.tolist()):
                answers[i] = _text_before_eos(processor.tokenizer, row)
            bar.update(len(indices))
        if unpruned_answers is None:  # the first run is the unpruned one
            unpruned_answers = answers
        scored = score(questions, answers)
        results.append({"variant": variant, "keep": keep, "ffn": ffn, "exact_match": scored["exact_match"],
                        "correct": scored["correct"], "per_type": scored["per_type"],
                        "agreement_with_unpruned": agreement(answers, unpruned_answers),
                        "seconds": round(time.perf_counter() - start, 2)})
    bar.close()
    summary = {
        "data": data, "questions": len(questions), "model": model_name, "layer": layer, "keeps": list(keeps),
        "variants": list(variants), "visual_tokens": fewest, "ffn_layers": ffn_layers, "ffn_note": ffn_note,
        "random_seed": seed, "max_new_tokens": max_new_tokens, "runs": results,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if out is not None:
        from .folders import atomic_write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sweep.json", summary)
        plot_sweep(summary, out / "sweep.png")
    return summary


def _sweep_groups(capa, processor, questions: list[LabelledQuestion], batch_size: int = 16):
    """The questions in batches of prompts of one length (so no padding enters a forward pass,
    and each answer is the one the question gets alone), with their image features computed once
    for every run of the sweep: [(question indices, model inputs, packed image features)]."""
    import torch

    family = capa.family
    encoded = [family.encode(processor, [q.image], [q.question]) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: (encoded[i]["input_ids"].shape[1], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and \
                encoded[groups[-1][0]]["input_ids"].shape[1] == encoded[i]["input_ids"].shape[1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    device = capa.adapter.lm_head.weight.device
    result = []
    for indices in groups:
        batch = family.encode(processor, [questions[i].image for i in indices], [questions[i].question for i in indices])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.inference_mode():
            features = family.pack_image_features(capa.adapter.image_features(**capa.vision_inputs(batch)), batch)
        result.append((indices, batch, features))
    return result


def format_sweep_table(summary: dict) -> str:
    """Exact match per variant (rows; '+FFN' with the FFN approximation) and tokens kept (columns),
    then the same table's agreement with the unpruned answers."""
    keeps = summary["keeps"]
    unpruned = next(r for r in summary["runs"] if r["variant"] == "unpruned")
    rows = {}
    for run in summary["runs"]:
        if run["variant"] != "unpruned":
            rows.setdefault(run["variant"] + (" +FFN" if run["ffn"] else ""), {})[run["keep"]] = run
    lines = [f"{summary['data'] or str(summary['questions']) + ' questions'}: {summary['model']}, pruned after layer "
             f"{summary['layer']} (of {summary['visual_tokens']} visual tokens); unpruned: "
             f"{unpruned['exact_match']:.1%}"]
    if summary["ffn_layers"]:
        lines[0] += f"; +FFN: affine FFN on visual rows in layers {summary['ffn_layers']}"
    for title, key in (("exact match", "exact_match"), ("agreement with unpruned", "agreement_with_unpruned")):
        header = f"{title + ' / kept':<24}" + "".join(f"{k:>8}" for k in keeps)
        lines += ["", header, "-" * len(header)]
        for name, by_keep in rows.items():
            lines.append(f"{name:<24}" + "".join(f"{by_keep[k][key]:>8.1%}" if k in by_keep else f"{'-':>8}"
                                                 for k in keeps))
    if summary.get("ffn_note"):
        lines.append(summary["ffn_note"])
    return "\n".join(lines)


def plot_sweep(summary: dict, path: Path) -> None:
    """Accuracy against tokens kept, one line per variant (dashed: with the FFN approximation),
    the unpruned accuracy as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .folders import atomic_write_bytes

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(SWEEP_VARIANTS, ("tab:red", "tab:blue", "tab:green", "tab:grey")))
    for variant in summary["variants"]:
        for ffn in (False, True):
            runs = sorted((r for r in summary["runs"] if r["variant"] == variant and r["ffn"] == ffn),
                          key=lambda r: r["keep"])
            if runs:
                axes.plot([r["keep"] for r in runs], [100 * r["exact_match"] for r in runs], marker="o",
                          linestyle="--" if ffn else "-", color=colours.get(variant),
                          label=variant + (" + FFN approx." if ffn else ""))
    unpruned = next(r for r in summary["runs"] if r["variant"] == "unpruned")
    axes.axhline(100 * unpruned["exact_match"], color="black", linewidth=1, label="unpruned")
    axes.set_xscale("log", base=2)
    axes.set_xticks(summary["keeps"], [str(k) for k in summary["keeps"]])
    axes.set_xlabel(f"visual tokens kept after layer {summary['layer']} (of {summary['visual_tokens']})")
    axes.set_ylabel("exact match (%)")
    axes.set_title(f"{summary['model']}: {summary['data'] or str(summary['questions']) + ' questions'}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
