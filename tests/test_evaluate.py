"""`eval`: exact-match accuracy of greedy answers. The model's answers are checked against HF
`generate` on the same questions (an independent decoding loop), the scores and agreements against
counts made here from those answers, and an engine's answers against the CapaModel's."""

import json

import numpy as np
import pytest
import torch

from capa_export.cli import main
from capa_export.config import CapaConfig
from capa_export.data import shapes_vqa
from capa_export.data.shapes_vqa import normalize_answer
from capa_export.evaluate import RandomSelection, builtin_questions, evaluate, folder_questions, model_answers, sweep
from capa_export.method.capa_model import apply_capa
from capa_export.models import load_model
from capa_export.models.tiny import PAD_TOKEN_ID

MODEL = "tiny-llava"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def trained():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def questions():
    return builtin_questions(6)


def chat_prompt(processor, question):
    """The prompt from the processor's own chat template: one image, one question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def hf_greedy_answers(model, processor, questions, max_new_tokens=MAX_NEW_TOKENS):
    """HF generate, one question at a time, the text before the first </s>."""
    eos = processor.tokenizer.eos_token_id
    answers = []
    for q in questions:
        inputs = processor(images=q.image, text=chat_prompt(processor, q.question),
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=PAD_TOKEN_ID)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        answers.append(processor.tokenizer.decode(new[:new.index(eos)] if eos in new else new,
                                                  skip_special_tokens=True))
    return answers


def test_unpruned_answers_are_hf_generate_and_scores_count_them(trained, questions, tmp_path):
    model, processor = trained
    reference = hf_greedy_answers(model, processor, questions)
    summary = evaluate(questions, model_name=MODEL, config=CapaConfig(prune=[]), max_new_tokens=MAX_NEW_TOKENS,
                       out=tmp_path, progress=False)
    assert list(summary["runs"]) == ["capa"]  # nothing pruned or approximated: no second run
    assert summary["answers"]["capa"] == reference
    correct = [normalize_answer(a) == normalize_answer(q.answer) for a, q in zip(reference, questions)]
    assert summary["runs"]["capa"]["correct"] == sum(correct)
    assert summary["runs"]["capa"]["exact_match"] == sum(correct) / len(questions)
    for qtype, entry in summary["runs"]["capa"]["per_type"].items():
        mine = [c for c, q in zip(correct, questions) if q.type == qtype]
        assert entry == {"exact_match": sum(mine) / len(mine), "questions": len(mine)}
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["question"], r["predicted_capa"], r["correct_capa"]) for r in lines] == \
        [(q.question, a, c) for q, a, c in zip(questions, reference, correct)]
    assert json.loads((tmp_path / "summary.json").read_text())["runs"]["capa"]["correct"] == sum(correct)


def test_pruned_run_beside_the_unpruned_one(trained, questions):
    model, processor = trained
    summary = evaluate(questions, model_name=MODEL, config=CapaConfig(prune=[(2, 16)]),
                       max_new_tokens=MAX_NEW_TOKENS, progress=False)
    pruned, unpruned = summary["answers"]["capa"], summary["answers"]["unpruned"]
    assert unpruned == hf_greedy_answers(model, processor, questions)
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(pruned, unpruned))
    assert summary["agreement"] == {"capa vs unpruned": same / len(questions)}


def test_folder_questions_read_the_written_set(tmp_path):
    samples = shapes_vqa.make_split("test", 2, questions_per_image=2)
    shapes_vqa.write_folder(tmp_path / "set", samples)
    read = folder_questions(tmp_path / "set")
    assert [(q.question, q.answer, q.type) for q in read] == \
        [(q.text, q.answer, q.type) for s in samples for q in s.questions]
    assert read[0].image is read[1].image  # one image, opened once, for its two questions
    assert (np.asarray(read[0].image) == np.asarray(samples[0].image)).all()


def test_engine_answers_agree_with_the_capa_model(tmp_path):
    """fp32 engine of the trained tiny-llava (cpu profile, pruned after layer 3 to 64 tokens) and
    the CapaModel rebuilt from its calibration/: the same answer to every question."""
    from capa_export.pipeline import build

    path, report = build(MODEL, "cpu", out=tmp_path / "engine", prune=[(3, 64)], progress=False, log=lambda *_: None)
    assert report["passed"]
    summary = evaluate(builtin_questions(4), engine_dir=path, max_new_tokens=MAX_NEW_TOKENS, compare_unpruned=False,
                       progress=False)
    assert list(summary["runs"]) == ["engine", "capa"]
    assert summary["answers"]["engine"] == summary["answers"]["capa"]
    assert summary["agreement"] == {"engine vs capa": 1.0}


def test_cli_prints_the_table(tmp_path, capsys):
    assert main(["eval", "--model", MODEL, "--builtin", "2", "--prune", "2:32", "--max-new-tokens", "12",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "capa" in printed and "unpruned" in printed and "answers agree, capa vs unpruned" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["questions"] == 2 and set(summary["runs"]) == {"capa", "unpruned"}


def test_random_selection_draws_distinct_ascending_tokens_from_its_seed():
    probs = torch.zeros(3, 2, 4, 50)
    first, again = RandomSelection(7)(probs, None, None, 12), RandomSelection(7)(probs, None, None, 12)
    assert torch.equal(first, again) and first.shape == (3, 12)
    for row in first:
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= int(row.min()) and int(row.max()) < 50
    assert not torch.equal(first, RandomSelection(8)(probs, None, None, 12))


def test_sweep_runs_are_the_models_answers_alone(trained, tmp_path):
    """Each sweep run (questions batched by prompt length, image features computed once) answers as
    `model_answers` does one question at a time from the raw inputs; keeping every token is the
    unpruned model; the scores count the answers; the plot is a PNG."""
    model, processor = trained
    questions = builtin_questions(5)
    summary = sweep(questions, MODEL, keeps=(16, 576), variants=("contrib", "attention", "random"), with_ffn=False,
                    max_new_tokens=MAX_NEW_TOKENS, out=tmp_path, progress=False)
    runs = {(r["variant"], r["keep"], r["ffn"]): r for r in summary["runs"]}
    assert set(runs) == {("unpruned", None, False)} | {(v, k, False) for v in ("contrib", "attention", "random")
                                                        for k in (16, 576)}
    unpruned = hf_greedy_answers(model, processor, questions)
    for variant in ("contrib", "attention"):
        alone = model_answers(apply_capa(model, CapaConfig(prune=[(2, 16)], variant=variant)), processor, questions,
                              MAX_NEW_TOKENS, progress=False)
        correct = sum(normalize_answer(a) == normalize_answer(q.answer) for a, q in zip(alone, questions))
        assert runs[(variant, 16, False)]["correct"] == correct
        same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(alone, unpruned)) / len(questions)
        assert runs[(variant, 16, False)]["agreement_with_unpruned"] == same
        assert runs[(variant, 576, False)]["agreement_with_unpruned"] == 1.0
    hf_correct = sum(normalize_answer(a) == normalize_answer(q.answer) for a, q in zip(unpruned, questions))
    assert runs[("unpruned", None, False)]["correct"] == hf_correct
    assert json.loads((tmp_path / "sweep.json").read_text())["keeps"] == [16, 576]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--model", MODEL, "--sweep", "--sweep-keeps", "64,600"], "--sweep-keeps 600 is above the 576 visual tokens"),
    (["--model", MODEL, "--sweep", "--sweep-keeps", "0,16"], "must name token counts >= 1"),
    (["--model", MODEL, "--sweep", "--sweep-keeps", "a"], "must be comma-separated token counts"),
    (["--model", MODEL, "--sweep", "--sweep-variants", "contrib,bogus"], "expected a comma-separated subset"),
    (["{tmp}", "--sweep"], "--sweep runs the CapaModel at each setting: give --model"),
    (["--model", MODEL, "--data", "{tmp}/missing"], "does not exist"),
    (["--model", MODEL, "--data", "{tmp}"], "has no data.jsonl"),
    (["--model", MODEL, "--builtin", "0"], "--builtin 0 must be >= 1"),
    ([], "give an engine folder, or --model"),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["eval", *args, "--no-progress", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
