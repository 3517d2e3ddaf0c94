"""The LLaVA-NeXT family (tiny-llava-next): anyres crops, host-side packing, newline tokens kept
out of the pruning candidates (or not), engines built from a `save_pretrained` checkpoint.

Independent references: HF's `LlavaNextForConditionalGeneration` (its get_image_features, forward,
generate, and its own decoder layers on the reduced sequence); where HF's packed features equal
its learned `image_newline` (the newline slots); the CapaModel (itself tested against HF) for
engines."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from capa_export import CapaConfig, apply_capa
from capa_export.cli import main
from capa_export.errors import CapaError
from capa_export.models import adapter_for, load_model
from capa_export.runtime import CapaEngine

from .conftest import eager_attention
from .test_model import causal_mask, hf_decoder_inputs

#: (height, width): a wide picture (1 x 2 crops) and a tall one (2 x 1 crops, as many tokens
#: in another layout); the processor picks the grid from the aspect ratio
WIDE, TALL = (300, 400), (520, 260)
KEEP_FRACTION = "0.3"  # of each image's candidates (k = 403 of the wide picture's 1344: rounding exercised)


def picture(height, width, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def next_model():
    model, processor = load_model("tiny-llava-next")
    return eager_attention(model), processor


def encode(next_model, size, question="What is in the picture? Answer in detail.", seed=0):
    model, processor = next_model
    return adapter_for(model).family.encode(processor, [picture(*size, seed=seed)], [question])


def hf_packed_features(model, batch):
    with torch.no_grad():
        return torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output)


def test_grids_of_the_two_pictures_differ(next_model):
    family = adapter_for(next_model[0]).family
    assert family.grid(WIDE) == (1, 2) and family.grid(TALL) == (2, 1)


def test_packed_features_equal_hf_for_two_images_of_different_grids(next_model):
    """Crops through the (traceable) vision path, packed on the host, equal HF's own packing; the
    batch's second image has fewer crops than the first (its padding crops are dropped)."""
    model, processor = next_model
    family = adapter_for(model).family
    pixels = processor.image_processor(images=[picture(700, 700), picture(*WIDE, seed=1)], return_tensors="pt")
    assert pixels["pixel_values"].shape[1] == family.crops((700, 700)) == 5 and family.crops(WIDE) == 3
    with torch.no_grad():
        features = family.pack_image_features(adapter_for(model).image_features(pixels["pixel_values"]), pixels)
    torch.testing.assert_close(features, hf_packed_features(model, pixels), rtol=0, atol=0)


@pytest.mark.parametrize("size", [WIDE, TALL])
def test_newline_slots_are_where_hf_puts_image_newline(next_model, size):
    """The layout mask marks exactly the image-token slots HF fills with `image_newline`; the
    default candidates are the other image tokens, and with layout candidates every image token."""
    model, _ = next_model
    family = adapter_for(model).family
    batch = encode(next_model, size)
    slots = (batch["input_ids"][0] == family.image_token_id).nonzero()[:, 0]
    is_newline = (hf_packed_features(model, batch) == model.model.image_newline).all(-1)
    assert int(is_newline.sum()) == family.unpadded_grid(size)[0] > 0
    assert torch.equal(family.layout_token_mask(batch)[0, slots], is_newline)
    assert family.visual_positions(batch["input_ids"], batch)[0].tolist() == slots[~is_newline].tolist()
    assert family.visual_positions(batch["input_ids"], batch, layout_candidates=True)[0].tolist() == slots.tolist()


def check_unpruned_equals_hf(model, batch) -> None:
    """The unpruned CapaModel's logits = HF forward's, its greedy tokens = HF `generate`'s."""
    capa = apply_capa(model, CapaConfig(prune=[]))
    with torch.no_grad():
        expected = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    out = capa(**batch)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
    tokens, _ = capa.generate(**batch, max_new_tokens=6)
    assert tokens.tolist() == generated.tolist()


@pytest.mark.parametrize("size", [WIDE, TALL])
def test_unpruned_equals_hf_forward_and_generate(next_model, size):
    check_unpruned_equals_hf(next_model[0], encode(next_model, size))


def hf_reduced_reference(model, batch, kept_slots: list[int], layer: int):
    """Logits from HF's own decoder layers: every token up to `layer`, then only `kept_slots`
    (original sequence indices; positions gathered, not renumbered)."""
    lm = adapter_for(model).text_model
    embeds, positions = hf_decoder_inputs(model, batch)
    hidden, current = embeds, torch.arange(embeds.shape[1])
    with torch.no_grad():
        for index, decoder_layer in enumerate(lm.layers):
            if index == layer:
                current = torch.tensor(kept_slots)
                hidden = hidden[:, current]
            gathered = positions[..., current]
            out = decoder_layer(hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                                position_ids=gathered, position_embeddings=lm.rotary_emb(hidden, gathered))
            hidden = out[0] if isinstance(out, tuple) else out
        return adapter_for(model).lm_head(lm.norm(hidden))


def test_keep_fraction_counts_patch_tokens_only(next_model):
    """A fraction is of the candidates: with newlines kept, of the image tokens HF fills with patch
    features; with newlines as candidates, of every image token."""
    model, _ = next_model
    batch = encode(next_model, TALL)
    patches, image = hf_patch_tokens(model, batch), int((batch["input_ids"] == 32000).sum())
    assert image > patches
    for layout, n in ((False, patches), (True, image)):
        out = apply_capa(model, CapaConfig(prune=[(2, 0.3)], prune_layout_tokens=layout))(**batch, last_logits_only=True)
        assert out.keep_indices.shape == (1, expected_keep(n))


def check_pruned_equals_hf_layers(model, batch, layout_candidates: bool) -> None:
    """Keep 200 candidates from layer 2: text, the kept candidates and (by default) every newline
    stay; HF's layers on that sequence give the same logits (LLaVA-NeXT and OneVision)."""
    family = adapter_for(model).family
    out = apply_capa(model, CapaConfig(prune=[(2, 200)], prune_layout_tokens=layout_candidates))(**batch)
    candidates = family.visual_positions(batch["input_ids"], batch, layout_candidates=layout_candidates)[0]
    kept_candidates = set(candidates[out.keep_indices[0]].tolist())
    is_image = batch["input_ids"][0] == family.image_token_id
    newlines = family.layout_token_mask(batch)[0]
    kept = [p for p in range(batch["input_ids"].shape[1])
            if p in kept_candidates or not is_image[p] or (bool(newlines[p]) and not layout_candidates)]
    assert out.kept_positions[0].tolist() == kept
    if not layout_candidates:  # every newline survives
        assert set(newlines.nonzero()[:, 0].tolist()) <= set(kept)
    expected = hf_reduced_reference(model, batch, kept, layer=2)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout_candidates", [False, True])
def test_pruned_equals_hf_layers_on_the_reduced_sequence(next_model, layout_candidates):
    check_pruned_equals_hf_layers(next_model[0], encode(next_model, WIDE), layout_candidates)


def test_bench_sizes_are_real_llava_next_configs():
    """`capa-export bench --size llava-next-7b` builds a LlavaNextForConditionalGeneration with
    llava-v1.6-vicuna-7b's decoder (on the meta device here: no memory) fed a full 2 x 2 grid."""
    from capa_export.bench import sizes
    from capa_export.models.llava_next import LlavaNextFamily

    assert sizes()["llava-next-7b"] == sizes()["llava-next-mid"] == "llava_next"
    model, visual = LlavaNextFamily.bench_model("llava-next-7b", "meta")
    text = model.config.text_config
    assert model.config.model_type == "llava_next" and (text.hidden_size, text.num_hidden_layers) == (4096, 32)
    assert model.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert visual == 576 + 48 * 49  # base crop + 48 rows of 48 patches and a newline


def test_inconsistent_image_inputs_are_refused(next_model):
    model, _ = next_model
    batch = encode(next_model, WIDE)
    capa = apply_capa(model, CapaConfig(prune=[]))
    with pytest.raises(CapaError, match="without image_sizes"):
        capa(**{k: v for k, v in batch.items() if k != "image_sizes"})
    with pytest.raises(CapaError, match=r"needs 5 crops but pixel_values holds 3"):
        capa(**{**batch, "image_sizes": torch.tensor([[700, 700]])})
    with pytest.raises(CapaError, match="give one \\(height, width\\) per image"):
        capa(**{**batch, "image_sizes": torch.tensor([[300, 400], [300, 400]])})


@pytest.mark.parametrize("model, base_tokens", [("tiny-llava-next", 576), ("tiny-llava-onevision", 729)])
def test_keep_count_is_checked_against_the_fewest_candidates(tmp_path, capsys, model, base_tokens):
    """The base crop's tokens (576 for LLaVA-NeXT's CLIP, 729 for OneVision's SigLIP) are the
    fewest candidates any image gives: a k above them is refused before any work, in one line."""
    profile = tmp_path / "bad.toml"
    profile.write_text(f'backend = "onnxruntime"\nprune = [[2, {base_tokens + 24}]]\n')
    code = main(["build", "--model", model, "--profile", str(profile), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and f"keeps k={base_tokens + 24} but an image gives only {base_tokens} visual tokens" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# --- engines ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-llava-next saved as a checkpoint directory (random weights + processor), as a user has one."""
    model, processor = load_model("tiny-llava-next")
    directory = tmp_path_factory.mktemp("checkpoint") / "llava-next-checkpoint"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def next_engine(checkpoint, tmp_path_factory):
    """`capa-export build --model DIR --prune 2:0.3` (cpu profile: fp32; keep 30% of each image's
    patch tokens from layer 2, k computed from N inside the prefill graph), built once."""
    out = tmp_path_factory.mktemp("engines") / "next-cpu"
    assert main(["build", "--model", str(checkpoint), "--out", str(out), "--prune", f"2:{KEEP_FRACTION}"]) == 0
    return out


def expected_keep(num_candidates: int) -> int:
    """k for the engine's keep fraction, from its decimal definition: round(f * N), halves up, >= 1."""
    return max(1, math.floor(Fraction(KEEP_FRACTION) * num_candidates + Fraction(1, 2)))


def hf_patch_tokens(model, batch) -> int:
    """Image tokens HF fills with patch features (not with its image_newline)."""
    return int((hf_packed_features(model, batch) != model.model.image_newline).any(-1).sum())


def test_checkpoint_directory_builds_a_validated_engine(next_engine):
    manifest = json.loads((next_engine / "manifest.json").read_text())
    validation = json.loads((next_engine / "validation.json").read_text())
    assert manifest["complete"] and validation["passed"] and manifest["model"]["family"] == "llava_next"
    assert all(e["agreement"] == 1.0 for e in validation["end_to_end"])
    assert manifest["vision_dims"]["crops"] == [3, 5, 5]
    assert manifest["capa_config"]["prune_layout_tokens"] is False


@pytest.mark.parametrize("size", [WIDE, TALL])
def test_engine_equals_the_capa_model_on_two_aspect_ratios(next_engine, checkpoint, size):
    """Kept indices exact (k the fraction of the image's own patch tokens), greedy tokens equal, on a
    wide and a tall picture."""
    from capa_export.pipeline import load_calibration

    model, processor = load_model(str(checkpoint))
    config, approx = load_calibration(model, next_engine / "calibration")
    capa = apply_capa(model, config, approx)
    batch = capa.family.encode(processor, [picture(*size, seed=5)], ["Which colours are there?"])
    expected, prefill = capa.generate(**batch, max_new_tokens=5)
    with CapaEngine(next_engine) as engine:
        tokens, keep, _ = engine.generate_ids(batch, max_new_tokens=5)
    assert keep.tolist() == prefill.keep_indices.tolist()
    assert keep.shape == (1, expected_keep(hf_patch_tokens(model, batch)))
    assert tokens.tolist() == expected.tolist()


def test_more_crops_than_the_engine_takes_are_refused(next_engine):
    """An engine whose manifest says 3 crops at most refuses a long picture, which the processor
    cuts into 1 + 1 x 3 crops."""
    import shutil

    engine = next_engine.parent / "few-crops"
    shutil.copytree(next_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["vision_dims"]["crops"] = [3, 3, 3]
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with CapaEngine(engine) as runner:
        batch = runner.prepare([picture(200, 900)], ["What?"])
        with pytest.raises(CapaError, match="an image of 200x900 pixels is cut into 4 crops but the engine takes at most 3"):
            runner.generate_ids(batch, max_new_tokens=2)


def test_fp16_engine_of_the_embedded_model_validates(tmp_path, capsys):
    """fp16 graphs (ONNX Runtime CPU) of tiny-llava-next within the fp16 tolerances, kept indices
    exact, 90% teacher-forced agreement at least. The profile's sequence range covers an anyres
    prompt (the shipped edge profile stops at 1,024 tokens)."""
    profile = tmp_path / "next-fp16.toml"
    profile.write_text('name = "next-fp16"\nbackend = "onnxruntime"\nprecision = "fp16"\n'
                       'providers = ["CPUExecutionProvider"]\n[shapes]\nbatch = [1, 1, 1]\n'
                       'sequence = [8, 1500, 3072]\npast = [1, 1600, 4096]\nimages = [1, 1, 1]\n')
    code = main(["build", "--model", "tiny-llava-next", "--profile", str(profile), "--out", str(tmp_path / "fp16")])
    out = capsys.readouterr().out
    assert code == 0 and "validation PASSED (fp16, onnxruntime)" in out
    validation = json.loads((tmp_path / "fp16" / "validation.json").read_text())
    assert validation["passed"] and all(e["keep_overlap"] == 1.0 for e in validation["end_to_end"])
