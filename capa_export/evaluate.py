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
