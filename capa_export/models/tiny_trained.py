"""`tiny-llava`, the embedded default: a tiny LLaVA-geometry model trained on Shapes-VQA, shipped
with the package (named `tiny-llava-vqa` in results before 2026-11-25).

Same architecture family, token geometry, tokenizer, processor and chat template as the random
`tiny-llava-random` (`tiny.py`); the weights (`weights/model.safetensors`, fp16) come from
`python -m capa_export.training.train_tiny --ship`, and `weights/card.json` records how (task,
data seed, steps, widths, test accuracy, script version, wall time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CapaError
from .base import cast_model
from .registry import embedded_model
from .tiny import TinyLlavaSpec, tiny_llava_config, tiny_llava_processor

TRAINED_NAME = "tiny-llava"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def trained_card(folder: Path = WEIGHTS_DIR) -> dict:
    card = Path(folder) / "card.json"
    if not card.is_file():
        raise CapaError(f"{card} is missing; the trained tiny model ships with the package "
                        f"(re-create it with `python -m capa_export.training.train_tiny --ship`)")
    return json.loads(card.read_text())


@embedded_model(TRAINED_NAME, family="llava")
def build_trained_tiny_llava(dtype: torch.dtype = torch.float32, folder: Path = WEIGHTS_DIR):
    """(model, processor): a plain `LlavaForConditionalGeneration` with the shipped weights."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    card = trained_card(folder)
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise CapaError(f"{weights} is missing; re-create it with `python -m capa_export.training.train_tiny --ship`")
    spec = TinyLlavaSpec(**card["config"]["spec"])
    with no_init_weights():  # every tensor is overwritten below
        model = LlavaForConditionalGeneration(tiny_llava_config(spec))
    model.load_state_dict(load_file(str(weights)), strict=True)
    model = cast_model(model, dtype).eval()
    model.config.name_or_path = TRAINED_NAME
    return model, tiny_llava_processor()
