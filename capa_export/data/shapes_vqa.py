"""Shapes-VQA: a visual question-answering task generated in code, deterministic from a seed.

Each image is 336 x 336 (LLaVA-1.5's input size, so no resize blurs it) with 2 to 5 flat shapes
(circle, square, triangle, star; six colours; small or large) on a muted background (solid, gradient,
noise or stripes). The questions need the image and one or a few regions of it:

    colour   What colour is the triangle?            -> red       (the kind appears once)
    shape    What shape is the blue object?          -> star      (the colour appears once)
    count    How many circles are there?             -> 2         (0 to 5)
    size     Is the square small or large?           -> small
    left     Is the square left of the star?         -> yes | no  (centres at least 24 px apart)
    above    Is the circle above the triangle?       -> yes | no

Answers come from a vocabulary of 20 words (`ANSWERS`). Sample `index` of a split is drawn from
its own random stream, keyed by (seed, split, index), so any sample can be made on its own and the
three splits are different streams.

Colours are chosen so that every background pixel lies at least 68 (RGB Euclidean) from every
shape colour and shapes never touch: a shape's pixels, its colour, its extent and its centre can be
read back from the image alone (the tests do exactly that).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CapaError

IMAGE_SIZE = 336
SPLITS = ("train", "validation", "test")
KINDS = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 175, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 45, 205),
    "orange": (250, 135, 15),
}
SIZES = ("small", "large")
QUESTION_TYPES = ("colour", "shape", "count", "size", "left", "above")
MAX_COUNT = 5
ANSWERS = tuple(COLOURS) + KINDS + tuple(str(n) for n in range(MAX_COUNT + 1)) + SIZES + ("yes", "no")

# A shape's "radius" r: circle radius, square half-side / 0.9, triangle and star circumradius.
# Its width or height is then at most 2r and at least 1.73r, so every small shape (r <= 21) spans
# at most 42 px and every large one (r >= 32) at least 55 px.
RADIUS_RANGE = {"small": (15, 21), "large": (32, 42)}
SQUARE_HALF_SIDE = 0.9
STAR_INNER = 0.45
SHAPE_GAP = 6          # px between the bounding circles of two shapes
BORDER = 4             # px between a shape and the image edge
MIN_OFFSET = 24        # px between two centres along the axis a left/above question compares
COLOUR_JITTER = 10     # per channel, so shades vary; stays far nearer its own colour than any other
SHAPES_PER_IMAGE = (2, 5)
# Background pixel = gray level L plus per-channel offsets of at most 24 (12 tint + 12 texture).
BACKGROUND_LEVEL = (66, 194)
BACKGROUND_TINT = 12
BACKGROUND_TEXTURE = 12
_SPLIT_KEYS = {"train": 1, "validation": 2, "test": 3}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def bounding_radius(self) -> float:
        return self.radius * (SQUARE_HALF_SIDE * math.sqrt(2) if self.kind == "square" else 1.0)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: dict


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    type: str
    shapes: tuple[int, ...]   # indices into Scene.shapes of the regions the answer depends on


@dataclass
class VqaSample:
    split: str
    index: int
    scene: Scene
    questions: list[Question]
    _image: object = field(default=None, repr=False)

    @property
    def image(self):
        if self._image is None:
            self._image = render(self.scene)
        return self._image


def sample_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    if split not in _SPLIT_KEYS:
        raise CapaError(f"split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(_SPLIT_KEYS[split], index)))


# --- scenes ---------------------------------------------------------------------------------
def make_scene(rng: np.random.Generator, shapes: tuple[int, int] = SHAPES_PER_IMAGE) -> Scene:
    """A scene with between shapes[0] and shapes[1] shapes (the task's splits use 2 to 5; training
    may start with fewer, see `train_tiny`)."""
    count = int(rng.integers(shapes[0], shapes[1] + 1))
    while True:
        shapes = _place_shapes(rng, count)
        if shapes is not None:
            return Scene(shapes=tuple(shapes), background=_make_background_spec(rng))


def _place_shapes(rng, count) -> list[Shape] | None:
    shapes: list[Shape] = []
    for _ in range(count):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(2))]
        radius = float(rng.uniform(*RADIUS_RANGE[size]))
        base = np.array(COLOURS[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        for _attempt in range(100):
            probe = Shape(kind, colour, size, 0.0, 0.0, radius, rgb)
            reach = probe.bounding_radius + BORDER
            cx, cy = (float(v) for v in rng.uniform(reach, IMAGE_SIZE - reach, 2))
            if all(math.hypot(cx - s.cx, cy - s.cy) > s.bounding_radius + probe.bounding_radius + SHAPE_GAP
                   for s in shapes):
                shapes.append(Shape(kind, colour, size, cx, cy, radius, rgb))
                break
        else:
            return None
    return shapes


def _muted_colour(rng) -> list[int]:
    level = rng.uniform(*BACKGROUND_LEVEL)
    return [float(level + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT)) for _ in range(3)]


def _make_background_spec(rng) -> dict:
    style = ("solid", "gradient", "noise", "stripes")[int(rng.integers(4))]
    spec = {"style": style, "colour": _muted_colour(rng), "seed": int(rng.integers(2**31))}
    if style in ("gradient", "stripes"):
        spec["colour2"] = _muted_colour(rng)
        spec["angle"] = float(rng.uniform(0, math.pi))
        spec["period"] = float(rng.uniform(24, 80))
    return spec


def _background(spec: dict) -> np.ndarray:
    size = IMAGE_SIZE
    first = np.array(spec["colour"], dtype=np.float64)
    if spec["style"] == "solid":
        return np.broadcast_to(first, (size, size, 3)).copy()
    if spec["style"] == "noise":
        texture = np.random.default_rng(spec["seed"]).normal(0.0, 6.0, (size, size, 3))
        return first + np.clip(texture, -BACKGROUND_TEXTURE, BACKGROUND_TEXTURE)
    second = np.array(spec["colour2"], dtype=np.float64)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    along = xs * math.cos(spec["angle"]) + ys * math.sin(spec["angle"])
    if spec["style"] == "gradient":
        t = (along - along.min()) / (along.max() - along.min())
    else:
        t = (np.floor(along / spec["period"]) % 2)
    return first + t[..., None] * (second - first)


def shape_polygon(shape: Shape) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for a circle)."""
    cx, cy, r = shape.cx, shape.cy, shape.radius
    if shape.kind == "square":
        h = r * SQUARE_HALF_SIDE
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape.kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (math.radians(d) for d in (-90, 30, 150))]
    if shape.kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * STAR_INNER
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None


def render(scene: Scene):
    """The scene as an RGB PIL image; shapes are drawn without anti-aliasing (flat colours)."""
    from PIL import Image, ImageDraw

    pixels = np.clip(np.rint(_background(scene.background)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        polygon = shape_polygon(shape)
        if polygon is None:
            r = shape.radius
            draw.ellipse((shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r), fill=shape.rgb)
        else:
            draw.polygon(polygon, fill=shape.rgb)
    return image


def shape_index_map(scene: Scene) -> np.ndarray:
    """(336, 336) uint8: 0 for background, i + 1 where shape i is drawn (same geometry as `render`)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for i, shape in enumerate(scene.shapes):
        polygon = shape_polygon(shape)
        if polygon is None:
            r = shape.radius
            draw.ellipse((shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r), fill=i + 1)
        else:
            draw.polygon(polygon, fill=i + 1)
    return np.asarray(canvas)


def patch_shape_index(scene: Scene, patch: int = 14, min_cover: float = 0.2) -> np.ndarray:
    """(24, 24) int: per vision patch (row-major, the order of LLaVA's visual tokens), 0 or i + 1
    for the shape covering most of it, if it covers at least `min_cover` of the patch. So the
    visual tokens a question's regions occupy are those whose value is in `Question.shapes` + 1."""
    grid = IMAGE_SIZE // patch
    index = shape_index_map(scene).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    cover = np.stack([(index == i + 1).mean(-1) for i in range(len(scene.shapes))], axis=-1)
    best = cover.argmax(-1)
    return np.where(cover.max(-1) >= min_cover, best + 1, 0)


# --- questions ------------------------------------------------------------------------------
def scene_questions(scene: Scene) -> dict[str, list[Question]]:
    """Every question the task asks about this scene, by type (a type may have none)."""
    shapes = scene.shapes
    by_kind = {k: [i for i, s in enumerate(shapes) if s.kind == k] for k in KINDS}
    by_colour = {c: [i for i, s in enumerate(shapes) if s.colour == c] for c in COLOURS}
    unique_kinds = [k for k in KINDS if len(by_kind[k]) == 1]
    out: dict[str, list[Question]] = {t: [] for t in QUESTION_TYPES}
    for k in unique_kinds:
        (i,) = by_kind[k]
        out["colour"].append(Question(f"What colour is the {k}?", shapes[i].colour, "colour", (i,)))
        out["size"].append(Question(f"Is the {k} small or large?", shapes[i].size, "size", (i,)))
    for c, members in by_colour.items():
        if len(members) == 1:
            out["shape"].append(Question(f"What shape is the {c} object?", shapes[members[0]].kind, "shape",
                                         (members[0],)))
    for k in KINDS:
        out["count"].append(Question(f"How many {k}s are there?", str(len(by_kind[k])), "count",
                                     tuple(by_kind[k])))
    for a in unique_kinds:
        for b in unique_kinds:
            if a == b:
                continue
            (i,), (j,) = by_kind[a], by_kind[b]
            if abs(shapes[i].cx - shapes[j].cx) >= MIN_OFFSET:
                answer = "yes" if shapes[i].cx < shapes[j].cx else "no"
                out["left"].append(Question(f"Is the {a} left of the {b}?", answer, "left", (i, j)))
            if abs(shapes[i].cy - shapes[j].cy) >= MIN_OFFSET:
                answer = "yes" if shapes[i].cy < shapes[j].cy else "no"
                out["above"].append(Question(f"Is the {a} above the {b}?", answer, "above", (i, j)))
    return out


def pick_questions(scene: Scene, rng: np.random.Generator, count: int = 1) -> list[Question]:
    """`count` different questions: a type drawn uniformly among those the scene allows, then a
    question of that type uniformly (so each type is about equally frequent)."""
    available = {t: list(qs) for t, qs in scene_questions(scene).items() if qs}
    chosen: list[Question] = []
    while len(chosen) < count and available:
        types = sorted(available, key=QUESTION_TYPES.index)
        qtype = types[int(rng.integers(len(types)))]
        pool = available[qtype]
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
        if not pool:
            del available[qtype]
    return chosen


def make_sample(split: str, index: int, seed: int = 0, questions_per_image: int = 1,
                shapes: tuple[int, int] = SHAPES_PER_IMAGE) -> VqaSample:
    rng = sample_rng(split, index, seed)
    scene = make_scene(rng, shapes)
    return VqaSample(split, index, scene, pick_questions(scene, rng, questions_per_image))


def make_split(split: str, size: int, seed: int = 0, questions_per_image: int = 1, start: int = 0,
               shapes: tuple[int, int] = SHAPES_PER_IMAGE) -> list[VqaSample]:
    return [make_sample(split, i, seed, questions_per_image, shapes) for i in range(start, start + size)]


# --- answers ----------------------------------------------------------------------------------
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:'|~]")


def normalize_answer(text: str) -> str:
    """An answer in the form exact match compares, following the VQA evaluation's normalisation:
    lower case; surrounding whitespace dropped; punctuation removed (a full stop only when it is
    not a decimal point); number words to digits ("two" -> "2", "none" -> "0"); articles dropped;
    whitespace collapsed. So " Two." -> "2" and "The Red circle!" -> "red circle"."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _PUNCTUATION.sub(" ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


# --- the user-data folder format ------------------------------------------------------------
def write_folder(folder: str | Path, samples: list[VqaSample]) -> Path:
    """Save samples as `folder/images/<split>_<index>.png` + `folder/data.jsonl`, one line per
    question: {"image": "images/<file>", "question": ..., "answer": ...} (the `eval` input format)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in samples:
        name = f"images/{sample.split}_{sample.index:06d}.png"
        sample.image.save(folder / name)
        for q in sample.questions:
            lines.append(json.dumps({"image": name, "question": q.text, "answer": q.answer, "type": q.type}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


DATA_FILE = "data.jsonl"
#: data.jsonl is read whole: 64 MiB is ~500,000 questions.
MAX_DATA_BYTES = 64 << 20


@dataclass(frozen=True)
class VqaRecord:
    image: Path
    question: str
    answer: str
    type: str | None = None  # the question type, where the folder records it (the built-in task does)


def read_folder(folder: str | Path, max_bytes: int = MAX_DATA_BYTES) -> list[VqaRecord]:
    """Records of a folder in the format `write_folder` writes; refuses a bad folder with a
    one-line CapaError naming the file or line and what is expected. The folder is untrusted: the
    JSONL is read with a size cap, and every image path must stay inside the folder (relative, no
    '..', no link at any component, a regular file: `folders.confined_file`)."""
    from ..folders import confined_file, read_bytes

    folder = Path(folder)
    if not folder.is_dir():
        raise CapaError(f"data folder {folder} does not exist; give a folder with data.jsonl and its images")
    if not (folder / DATA_FILE).exists() and not (folder / DATA_FILE).is_symlink():
        raise CapaError(f"data folder {folder} has no {DATA_FILE}; expected one JSON object per line with "
                        f"\"image\", \"question\", \"answer\"")
    index = confined_file(folder, DATA_FILE)
    text = read_bytes(index, max_bytes=max_bytes).decode("utf-8", errors="replace")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{index}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CapaError(f"{where} is not valid JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(entry, dict):
            raise CapaError(f"{where} is not a JSON object; expected {{\"image\": ..., \"question\": ..., \"answer\": ...}}")
        for key in ("image", "question", "answer"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise CapaError(f"{where} has no {key!r} (a non-empty string); every line needs \"image\", "
                                f"\"question\", \"answer\"")
        name = entry["image"]
        if not name.startswith("/") and ".." not in name.split("/") and not (folder / name).exists():
            raise CapaError(f"{where} names image {name!r}, which does not exist under {folder}")
        image = confined_file(folder, name, source=where)
        records.append(VqaRecord(image, entry["question"], entry["answer"],
                                 entry["type"] if isinstance(entry.get("type"), str) else None))
    if not records:
        raise CapaError(f"{index} holds no question; expected at least one line {{\"image\", \"question\", \"answer\"}}")
    return records


# --- looking at it --------------------------------------------------------------------------
def render_sample_grid(path: str | Path, split: str = "validation", count: int = 12, seed: int = 0,
                       columns: int = 4) -> Path:
    """A PNG grid of `count` samples with their question and answer, for people to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = make_split(split, count, seed)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows))
    for ax, sample in zip(np.ravel(axes), samples):
        ax.imshow(sample.image)
        q = sample.questions[0]
        ax.set_title(f"{q.text}\n→ {q.answer}", fontsize=9)
        ax.axis("off")
    for ax in np.ravel(axes)[len(samples):]:
        ax.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def write_sample(out: str | Path, split: str = "test", index: int = 0, seed: int = 0) -> tuple[Path, Question]:
    """One task image as a PNG with its first question and answer beside it (question.txt,
    answer.txt): what `make demo` asks the trained model's engine, for a person to check."""
    if index < 0:
        raise CapaError(f"--index {index} is negative; expected a sample number >= 0")
    sample = make_sample(split, index, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample.image.save(out / "image.png")
    question = sample.questions[0]
    (out / "question.txt").write_text(question.text + "\n")
    (out / "answer.txt").write_text(question.answer + "\n")
    return out / "image.png", question
