"""Shapes-VQA: determinism, disjoint splits, answers checked against the rendered pixels, answer
normalisation, and the folder format's writer and reader."""

import hashlib
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from capa_export.data import shapes_vqa
from capa_export.data.shapes_vqa import make_sample, make_split, normalize_answer, read_folder, write_folder
from capa_export.errors import CapaError

# What a person would call these colours; the reading below only needs them to be far apart.
REFERENCE_COLOURS = {"red": (215, 35, 35), "green": (35, 175, 55), "blue": (35, 75, 225),
                     "yellow": (240, 210, 30), "purple": (150, 45, 205), "orange": (250, 135, 15)}


def image_digest(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def read_shapes_from_pixels(image) -> list[dict]:
    """The shapes of an image, found from its pixels alone: connected regions of pixels near one
    of the six colours; kind from how much of its bounding box a region fills (square 1, circle
    pi/4, triangle 1/2, five-point star ~0.38); size from its larger extent; position from its
    centroid."""
    pixels = np.asarray(image).astype(np.float64)
    palette = np.array(list(REFERENCE_COLOURS.values()), dtype=np.float64)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distance.argmin(-1)
    labels, count = ndimage.label(distance.min(-1) < 35)
    shapes = []
    for region in range(1, count + 1):
        ys, xs = np.nonzero(labels == region)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = len(xs) / (height * width)
        kind = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle" if fill > 0.45 else "star"
        colours = np.bincount(nearest[ys, xs], minlength=len(palette))
        shapes.append({
            "kind": kind, "colour": list(REFERENCE_COLOURS)[int(colours.argmax())],
            "colour_purity": colours.max() / len(xs), "area": len(xs),
            "size": "large" if max(height, width) > 48 else "small",
            "x": xs.mean(), "y": ys.mean(),
        })
    return shapes


def answer_from_pixels(question: str, shapes: list[dict]) -> str:
    """The answer to a Shapes-VQA question, worked out from the shapes read off the pixels."""
    def the(kind):
        found = [s for s in shapes if s["kind"] == kind]
        assert len(found) == 1, f"{question!r}: {len(found)} {kind}s in the image, expected exactly one"
        return found[0]

    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return the(m[1])["colour"]
    if m := re.fullmatch(r"Is the (\w+) small or large\?", question):
        return the(m[1])["size"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        found = [s for s in shapes if s["colour"] == m[1]]
        assert len(found) == 1, f"{question!r}: {len(found)} {m[1]} shapes, expected exactly one"
        return found[0]["kind"]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(s["kind"] == m[1] for s in shapes))
    if m := re.fullmatch(r"Is the (\w+) left of the (\w+)\?", question):
        return "yes" if the(m[1])["x"] < the(m[2])["x"] else "no"
    if m := re.fullmatch(r"Is the (\w+) above the (\w+)\?", question):
        return "yes" if the(m[1])["y"] < the(m[2])["y"] else "no"
    raise AssertionError(f"question {question!r} matches no known form")


def test_same_seed_same_sample_other_seed_other_sample():
    a, b = make_sample("train", 7, seed=3, questions_per_image=3), make_sample("train", 7, seed=3, questions_per_image=3)
    assert image_digest(a.image) == image_digest(b.image)
    assert a.questions == b.questions
    c = make_sample("train", 7, seed=4, questions_per_image=3)
    assert image_digest(c.image) != image_digest(a.image)
    # a sample does not depend on which others were made before it
    assert image_digest(make_split("train", 3, seed=3, start=6)[1].image) == image_digest(a.image)


def test_splits_are_disjoint():
    digests = {split: {image_digest(s.image) for s in make_split(split, 150)} for split in shapes_vqa.SPLITS}
    for split, found in digests.items():
        assert len(found) == 150, f"{split} repeats an image"
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]
    with pytest.raises(CapaError, match="split 'dev' is unknown"):
        make_sample("dev", 0)


def test_every_answer_agrees_with_the_pixels():
    checked = {t: 0 for t in shapes_vqa.QUESTION_TYPES}
    for sample in make_split("validation", 120):
        shapes = read_shapes_from_pixels(sample.image)
        assert len(shapes) == len(sample.scene.shapes), "shapes touch, or a background pixel looks like a shape"
        assert all(s["colour_purity"] == 1.0 for s in shapes)
        for questions in shapes_vqa.scene_questions(sample.scene).values():
            for q in questions:
                assert q.answer == answer_from_pixels(q.text, shapes), q
                checked[q.type] += 1
    assert min(checked.values()) >= 20, checked


def test_colour_at_the_centre_of_the_named_shape_is_the_answer():
    palette = np.array(list(REFERENCE_COLOURS.values()), dtype=np.float64)
    for sample in make_split("test", 40, questions_per_image=6):
        pixels = np.asarray(sample.image).astype(np.float64)
        for q in sample.questions:
            if q.type != "colour":
                continue
            shape = sample.scene.shapes[q.shapes[0]]
            centre = pixels[int(round(shape.cy)), int(round(shape.cx))]
            assert list(REFERENCE_COLOURS)[np.linalg.norm(palette - centre, axis=1).argmin()] == q.answer


def test_questions_cover_every_type_and_answers_stay_in_the_vocabulary():
    samples = make_split("train", 300)
    types = {s.questions[0].type for s in samples}
    assert types == set(shapes_vqa.QUESTION_TYPES)
    assert {s.questions[0].answer for s in samples} <= set(shapes_vqa.ANSWERS)
    many = make_sample("train", 0, questions_per_image=4).questions
    assert len({q.text for q in many}) == len(many)


@pytest.mark.parametrize("raw, expected", [
    ("red", "red"), ("  Red.  ", "red"), ("RED!", "red"), ("the red", "red"), ("A circle", "circle"),
    ("Two", "2"), ("2.", "2"), ("none", "0"), ("zero", "0"), ("yes,", "yes"), ("\tno\n", "no"),
    ("1.5", "1.5"), ("triangle?", "triangle"), ("small  ,large", "small large"), ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_keeps_different_answers_apart():
    normalised = {normalize_answer(a) for a in shapes_vqa.ANSWERS}
    assert len(normalised) == len(shapes_vqa.ANSWERS)
    assert normalize_answer("red") != normalize_answer("green")


def test_folder_round_trip(tmp_path):
    samples = make_split("test", 4, questions_per_image=2)
    write_folder(tmp_path / "set", samples)
    records = read_folder(tmp_path / "set")
    assert [(r.question, r.answer) for r in records] == [(q.text, q.answer) for s in samples for q in s.questions]
    from PIL import Image

    assert image_digest(Image.open(records[0].image).convert("RGB")) == image_digest(samples[0].image)


def _write_lines(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def assert_refused(folder, pattern):
    with pytest.raises(CapaError, match=pattern) as caught:
        read_folder(folder)
    assert "\n" not in str(caught.value)


def test_reader_refuses_bad_folders(tmp_path):
    assert_refused(tmp_path / "missing", "does not exist")
    (tmp_path / "empty_dir").mkdir()
    assert_refused(tmp_path / "empty_dir", "has no data.jsonl")
    assert_refused(_write_lines(tmp_path / "blank", [""]), "holds no question")
    assert_refused(_write_lines(tmp_path / "broken", ["{not json"]), r"data.jsonl:1 is not valid JSON")
    assert_refused(_write_lines(tmp_path / "list", ["[1, 2]"]), r"data.jsonl:1 is not a JSON object")
    good = tmp_path / "good"
    write_folder(good, make_split("test", 1))
    image = json.loads((good / "data.jsonl").read_text().splitlines()[0])["image"]
    assert_refused(_write_lines(good, [json.dumps({"image": image, "question": "q?", "answer": "a"}),
                                       json.dumps({"image": image, "question": "q?"})]), r"data.jsonl:2 has no 'answer'")
    assert_refused(_write_lines(good, [json.dumps({"image": "nope.png", "question": "q?", "answer": "a"})]),
                   r"names image 'nope.png', which does not exist")
    assert_refused(_write_lines(good, [json.dumps({"image": image, "question": "", "answer": "a"})]),
                   r"data.jsonl:1 has no 'question'")


def test_reader_keeps_image_paths_inside_the_folder(tmp_path):
    """The folder is untrusted: an image named outside it, or reached through a link, is refused
    even when the file exists."""
    good = tmp_path / "good"
    write_folder(good, make_split("test", 1))
    image = json.loads((good / "data.jsonl").read_text().splitlines()[0])["image"]
    outside = tmp_path / "outside.png"
    outside.write_bytes((good / image).read_bytes())
    line = {"question": "q?", "answer": "a"}
    assert_refused(_write_lines(good, [json.dumps({**line, "image": "../outside.png"})]), r"contains '\.\.'")
    assert_refused(_write_lines(good, [json.dumps({**line, "image": str(outside)})]), r"is absolute")
    (good / "images" / "link.png").symlink_to(outside)
    assert_refused(_write_lines(good, [json.dumps({**line, "image": "images/link.png"})]), r"symbolic link")


def test_patch_map_marks_the_patches_the_shapes_cover():
    """Each patch labelled with shape i holds at least 20% pixels of that shape's colour, and every
    shape owns at least one patch."""
    palette = np.array(list(REFERENCE_COLOURS.values()), dtype=np.float64)
    for sample in make_split("validation", 30):
        pixels = np.asarray(sample.image).astype(np.float64)
        distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
        colour_of = np.where(distance.min(-1) < 35, distance.argmin(-1), -1)
        patches = colour_of.reshape(24, 14, 24, 14).transpose(0, 2, 1, 3).reshape(24, 24, 196)
        owner = shapes_vqa.patch_shape_index(sample.scene)
        for i, shape in enumerate(sample.scene.shapes):
            colour = list(REFERENCE_COLOURS).index(shape.colour)
            rows, cols = np.nonzero(owner == i + 1)
            assert len(rows) >= 1
            for r, c in zip(rows, cols):
                assert (patches[r, c] == colour).mean() >= 0.2
        assert owner.max() <= len(sample.scene.shapes)


def test_demo_sample_writer_gives_the_image_question_and_answer_of_the_split(tmp_path, capsys):
    """`python -m capa_export.data` (what `make demo` asks): the PNG is the sample's own rendering and
    the expected answer is the one the sample's pixels give (checked above); a bad split or index is
    one line, exit 2, nothing written."""
    from PIL import Image

    from capa_export.data.__main__ import main

    assert main(["--split", "test", "--index", "3", "--out", str(tmp_path / "demo")]) == 0
    sample = shapes_vqa.make_sample("test", 3)
    written = np.asarray(Image.open(tmp_path / "demo" / "image.png").convert("RGB"))
    assert np.array_equal(written, np.asarray(sample.image.convert("RGB")))
    assert (tmp_path / "demo" / "question.txt").read_text().strip() == sample.questions[0].text
    assert (tmp_path / "demo" / "answer.txt").read_text().strip() == sample.questions[0].answer
    assert sample.questions[0].answer in capsys.readouterr().out
    for argv in (["--split", "nope"], ["--index", "-1"]):
        assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0]
    assert not (tmp_path / "bad").exists()
