import numpy as np
import pytest
import torch
from PIL import Image

from capa_export.models import adapter_for, load_model


#: the embedded models every model test runs on: one per family (a new family's tiny model joins
#: the table by being registered with @embedded_model)
TEST_MODELS = ["tiny-llava-random", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def eager_attention(model):
    """HF's eager attention everywhere, so its own forward exposes attention probabilities (the
    independent reference of the scoring tests)."""
    for config in (model.config, adapter_for(model).text_model.config):
        config._attn_implementation = "eager"
    return model


@pytest.fixture(scope="session", params=TEST_MODELS)
def tiny(request):
    """(model, processor) of an embedded model, with eager attention."""
    model, processor = load_model(request.param)
    return eager_attention(model), processor


@pytest.fixture(scope="session")
def llava():
    """tiny-llava, with eager attention: the model of `cpu_engine` (tests of that engine use it)."""
    model, processor = load_model("tiny-llava-random")
    return eager_attention(model), processor


@pytest.fixture(scope="session")
def tiny_batch(tiny):
    """Processor outputs for one picture that is not square and a question."""
    model, processor = tiny
    family = adapter_for(model).family
    image = Image.fromarray((np.random.RandomState(0).rand(300, 400, 3) * 255).astype("uint8"))
    return family.encode(processor, [image], ["What is in the picture? Answer in detail."])


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory):
    """(private key path, public key path): an Ed25519 pair made for this session."""
    from capa_export.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def cpu_engine(tmp_path_factory, signing_keys):
    """The default engine (tiny-llava, cpu profile), built, validated and signed (manifest.sig, with
    signing_keys) once per session."""
    from capa_export.pipeline import build

    path, report = build("tiny-llava-random", "cpu", out=tmp_path_factory.mktemp("engines") / "cpu", progress=False,
                         log=lambda *_: None, sign_key=signing_keys[0])
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
