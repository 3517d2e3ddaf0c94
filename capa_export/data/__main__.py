"""`python -m capa_export.data`: one Shapes-VQA task image with its question and expected answer
(what `make demo` asks the trained model's engine, for a person to check)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CapaError
from . import shapes_vqa


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capa_export.data",
                                     description="Write one Shapes-VQA image with its question and expected answer.")
    parser.add_argument("--split", default="test", help=f"one of {', '.join(shapes_vqa.SPLITS)} (default: test)")
    parser.add_argument("--index", type=int, default=0, help="sample number in the split (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: 0, the shipped model's)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder (default: out/demo)")
    args = parser.parse_args(argv)
    try:
        image, question = shapes_vqa.write_sample(args.out, args.split, args.index, args.seed)
    except CapaError as exc:
        print(f"python -m capa_export.data: error: {exc}", file=sys.stderr)
        return 2
    print(f"{image}: {question.text} (expected answer: {question.answer})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
