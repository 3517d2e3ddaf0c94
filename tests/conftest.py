import numpy as np
import pytest
import torch
from PIL import Image

from capa_export.models import adapter_for, load_model


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the embedded default, with HF's eager attention so its own forward
    exposes attention probabilities (used as the independent reference)."""
    model, processor = load_model("tiny-llava")
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    return model, processor


@pytest.fixture(scope="session")
def tiny_batch(tiny):
    model, processor = tiny
    adapter = adapter_for(model)
    image = Image.fromarray((np.random.RandomState(0).rand(300, 400, 3) * 255).astype("uint8"))
    prompt = adapter.prompt_with_image(processor, "What is in the picture? Answer in detail.")
    return dict(processor(images=image, text=prompt, return_tensors="pt"))


@pytest.fixture(scope="session")
def cpu_engine(tmp_path_factory):
    """The default engine (tiny-llava, cpu profile), built and validated once per session."""
    from capa_export.pipeline import build

    path, report = build("tiny-llava", "cpu", out=tmp_path_factory.mktemp("engines") / "cpu", progress=False,
                                log=lambda *_: None)
    return path, report


def brute_force_scores(probs, values, o_weight, variant):
    """float64, explicit loops over keys and heads, materialising every v_j^h W_O^h."""
    probs, values, o_weight = probs.double(), values.double(), o_weight.double()
    b_size, heads, queries, keys = probs.shape
    kv_heads, dim = values.shape[1], values.shape[3]
    group = heads // kv_heads
    out = torch.zeros(b_size, keys, dtype=torch.float64)
    for b in range(b_size):
        for j in range(keys):
            projected = [values[b, h // group, j] @ o_weight[:, h * dim:(h + 1) * dim].T for h in range(heads)]
            for i in range(queries):
                if variant == "contrib":
                    out[b, j] += sum(probs[b, h, i, j] * projected[h] for h in range(heads)).norm()
                elif variant == "value_norm":
                    out[b, j] += sum(probs[b, h, i, j] * values[b, h // group, j].norm() for h in range(heads))
                else:
                    out[b, j] += probs[b, :, i, j].sum()
    return out
