"""The LLaVA-OneVision family (tiny-llava-onevision): SigLIP crops, anyres_max_9 packing on the host,
newline tokens kept out of the pruning candidates, multi-image prompts, engines built from a
`save_pretrained` checkpoint.

Independent references: HF's `LlavaOnevisionForConditionalGeneration` (its get_image_features,
pack_image_features, forward, generate, and its own decoder layers on the reduced sequence); where
HF's packed features equal its learned `image_newline` (the newline slots); the HF config's and
image processor's default pinpoints; the CapaModel (itself tested against HF) for engines."""

import json
import math
from fractions import Fraction

import pytest
import torch

from capa_export import CapaConfig, apply_capa
from capa_export.cli import main
from capa_export.errors import CapaError
from capa_export.models import adapter_for, load_model
from capa_export.runtime import CapaEngine

from .conftest import eager_attention
from .test_llava_next import check_pruned_equals_hf_layers, check_unpruned_equals_hf, picture

#: (height, width): a wide picture (1 x 2 crops) and a tall one (2 x 1 crops); both unpad to under
#: 1,800 tokens, so prompts fit the cpu profile's 2,048
WIDE, TALL = (300, 400), (400, 300)
#: a picture the processor cuts into 1 + 4 x 5 crops, whose unpadded 102 x 135 grid (1.45 x 9 crops'
#: worth of patches) anyres_max_9 downsamples to 70 x 93
LARGE = (1200, 1600)
KEEP_FRACTION = "0.3"  # of each image's patch tokens (k = 292 of the wide picture's 972 + 729)
QUESTION = "What is in the picture? Answer in detail."


@pytest.fixture(scope="module")
def ov_model():
    model, processor = load_model("tiny-llava-onevision")
    return eager_attention(model), processor


def encode(ov_model, size, question=QUESTION, seed=0):
    model, processor = ov_model
    return adapter_for(model).family.encode(processor, [picture(*size, seed=seed)], [question])


def encode_two_images(ov_model):
    """One prompt holding two pictures: the processor gives each one crop (padded to square)."""
    model, processor = ov_model
    family = adapter_for(model).family
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=[[picture(*WIDE, seed=1), picture(*TALL, seed=2)]], text=[prompt], return_tensors="pt")
    return {k: batch[k] for k in family.processor_keys if k in batch}


def hf_packed_features(model, batch):
    with torch.no_grad():
        return torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                        batch_num_images=batch.get("batch_num_images")).pooler_output)


def hf_patch_tokens(model, batch) -> int:
    """Image tokens HF fills with patch features (not with its image_newline)."""
    return int((hf_packed_features(model, batch) != model.model.image_newline).any(-1).sum())


def test_tiny_has_onevision_geometry(ov_model):
    """SigLIP 384 / 14 crops of 729 tokens, the checkpoints' 36 pinpoints (the HF config's and image
    processor's defaults), Qwen2's image token, anyres_max_9 in model and processor."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    model, processor = ov_model
    family = adapter_for(model).family
    assert family.crop_tokens == 729 and family.image_token_id == 151646 == processor.image_token_id
    assert model.config.image_grid_pinpoints == LlavaOnevisionConfig().image_grid_pinpoints
    assert processor.image_processor.image_grid_pinpoints == LlavaOnevisionImageProcessorPil.image_grid_pinpoints
    assert len(family.pinpoints) == 36 and family._grid_extremes() == (2, 37)
    assert model.config.vision_aspect_ratio == processor.vision_aspect_ratio == "anyres_max_9"
    assert family.grid(WIDE) == (1, 2) and family.grid(TALL) == (2, 1) and family.grid(LARGE) == (4, 5)
    assert family.prompt(processor, "Q?") == "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("size", [WIDE, TALL, LARGE, (200, 2000)])
def test_token_count_equals_the_processors(ov_model, size):
    """The family's count of an image's tokens is what the processor writes into the prompt (the
    large picture's after the max-9 downsampling)."""
    model, _ = ov_model
    family = adapter_for(model).family
    batch = encode(ov_model, size)
    assert family.image_tokens(size) == int((batch["input_ids"] == family.image_token_id).sum())
    low, high = family.visual_token_range()
    assert low == 729 <= family.image_tokens(size) - family.unpadded_grid(size)[0] <= high


def test_packed_features_equal_hf_for_images_of_different_grids(ov_model):
    """Crops through the (traceable) vision path, packed on the host, equal HF's own get_image_features
    for a batch of three images of different grids, one of them downsampled by anyres_max_9 (the
    others' padding crops dropped)."""
    model, processor = ov_model
    family = adapter_for(model).family
    pixels = processor.image_processor(images=[picture(*LARGE), picture(*WIDE, seed=1), picture(*TALL, seed=2)],
                                       return_tensors="pt")
    assert pixels["pixel_values"].shape[1] == family.crops(LARGE) == 21 and family.crops(WIDE) == 3
    rows, cols = family.unpadded_grid(LARGE)
    assert (rows, cols) == (70, 93) and rows * cols < 102 * 135  # downsampled
    with torch.no_grad():
        features = family.pack_image_features(adapter_for(model).image_features(pixels["pixel_values"]), pixels)
    torch.testing.assert_close(features, hf_packed_features(model, pixels), rtol=0, atol=0)


def test_downsampled_packing_equals_hf_pack_image_features(ov_model):
    """At the function level, on random crop features: a grid that unpads to more than 9 crops' worth
    (3 x 4 crops of a 4:3 picture) is downsampled exactly as HF's LlavaOnevisionModel.pack_image_features
    does (called on a model that holds the same config), and a one-crop image ends with one newline."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from capa_export.models.tiny_llava_onevision import tiny_llava_onevision_config

    config = tiny_llava_onevision_config()
    with torch.device("meta"):
        hf = LlavaOnevisionModel(config)
    family = adapter_for(ov_model[0]).family
    size, hidden = (1152, 1536), 8  # 81 x 108 patches, nothing to unpad: ratio sqrt(8748 / 6561) = 1.155
    assert family.grid(size) == (3, 4) and family.unpadded_grid(size) == (70, 93)
    generator = torch.Generator().manual_seed(0)
    crops = torch.randn(1, 13, 729, hidden, generator=generator)
    single = torch.randn(1, 1, 729, hidden, generator=generator)
    newline = torch.randn(hidden, generator=generator)
    sizes = torch.tensor([list(size), [300, 400]])
    expected, _ = LlavaOnevisionModel.pack_image_features(hf, [crops[0], single[0]], sizes, image_newline=newline,
                                                          vision_aspect_ratio="anyres_max_9")
    flat = torch.cat([torch.cat([crops, torch.cat([single, torch.zeros(1, 12, 729, hidden)], 1)]).reshape(-1, hidden),
                      newline[None]])
    batch = {"pixel_values": torch.zeros(2, 13, 3, 384, 384), "image_sizes": sizes, "batch_num_images": [3]}
    with pytest.raises(CapaError, match="does not add up"):
        family.pack_image_features(flat, batch)
    ours = family.pack_image_features(flat, {**batch, "batch_num_images": torch.tensor([1, 1])})
    assert ours.shape[0] == 729 + 70 * 94 + family.image_tokens((300, 400))
    torch.testing.assert_close(ours[: 729 + 70 * 94], expected[0], rtol=0, atol=0)
    # the one-crop image (an image of a two-image prompt): its crop, then one newline
    ours = family.pack_image_features(flat, {**batch, "batch_num_images": torch.tensor([2])})
    torch.testing.assert_close(ours[-730:], expected[1], rtol=0, atol=0)
    assert torch.equal(ours[-1], newline)


@pytest.mark.parametrize("size", [WIDE, TALL, LARGE])
def test_newline_slots_are_where_hf_puts_image_newline(ov_model, size):
    """The layout mask marks exactly the image-token slots HF fills with `image_newline` (after the
    downsampling for the large picture; none in the base crop); the default candidates are the other
    image tokens, and with layout candidates every image token."""
    model, _ = ov_model
    family = adapter_for(model).family
    batch = encode(ov_model, size)
    slots = (batch["input_ids"][0] == family.image_token_id).nonzero()[:, 0]
    is_newline = (hf_packed_features(model, batch) == model.model.image_newline).all(-1)
    assert int(is_newline.sum()) == family.unpadded_grid(size)[0] > 0 and not bool(is_newline[:729].any())
    assert torch.equal(family.layout_token_mask(batch)[0, slots], is_newline)
    assert family.visual_positions(batch["input_ids"], batch)[0].tolist() == slots[~is_newline].tolist()
    assert family.visual_positions(batch["input_ids"], batch, layout_candidates=True)[0].tolist() == slots.tolist()


@pytest.mark.parametrize("size", [WIDE, TALL])
def test_unpruned_equals_hf_forward_and_generate(ov_model, size):
    check_unpruned_equals_hf(ov_model[0], encode(ov_model, size))


def test_two_images_in_one_prompt_equal_hf(ov_model):
    """A prompt of two images (batch_num_images = [2]): each is one crop and a newline, as HF packs
    them; the CapaModel's logits equal HF's and the mask finds both newlines."""
    model, _ = ov_model
    family = adapter_for(model).family
    batch = encode_two_images(ov_model)
    assert batch["batch_num_images"].tolist() == [2] and batch["pixel_values"].shape[1] == 1
    slots = (batch["input_ids"][0] == family.image_token_id).nonzero()[:, 0]
    assert len(slots) == 2 * 730
    is_newline = (hf_packed_features(model, batch) == model.model.image_newline).all(-1)
    assert is_newline.nonzero()[:, 0].tolist() == [729, 1459]
    assert torch.equal(family.layout_token_mask(batch)[0, slots], is_newline)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(apply_capa(model, CapaConfig(prune=[]))(**batch).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout_candidates", [False, True])
def test_pruned_equals_hf_layers_on_the_reduced_sequence(ov_model, layout_candidates):
    check_pruned_equals_hf_layers(ov_model[0], encode(ov_model, WIDE), layout_candidates)


def test_inconsistent_image_inputs_are_refused(ov_model):
    model, _ = ov_model
    batch = encode(ov_model, WIDE)
    capa = apply_capa(model, CapaConfig(prune=[]))
    cases = [({"image_sizes": None}, "without image_sizes"),
             ({"image_sizes": torch.tensor(list(LARGE))[None]}, r"needs 21 crops but pixel_values holds 3"),
             ({"image_sizes": torch.tensor([list(WIDE)] * 2)}, r"give one \(height, width\) per image"),
             ({"batch_num_images": torch.tensor([2])}, r"batch_num_images \[2\] does not add up to the 1 image")]
    for change, message in cases:
        with pytest.raises(CapaError, match=message) as refused:
            capa(**{k: v for k, v in {**batch, **change}.items() if v is not None})
        assert len(str(refused.value).splitlines()) == 1


def test_a_tower_that_does_not_give_729_features_per_crop_is_refused():
    """HF's packing needs side x side features per crop: a SigLIP tower read with "full". Another
    strategy is refused in one line when the model is wrapped, not deep inside packing."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from capa_export.models.tiny_llava_onevision import tiny_llava_onevision_config

    config = tiny_llava_onevision_config()
    config.vision_feature_select_strategy = "default"
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    with pytest.raises(CapaError, match="vision_feature_select_strategy='default'; capa-export serves") as refused:
        adapter_for(model)
    assert len(str(refused.value).splitlines()) == 1


# --- engines ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-llava-onevision saved as a checkpoint directory (random weights + processor)."""
    model, processor = load_model("tiny-llava-onevision")
    directory = tmp_path_factory.mktemp("checkpoint") / "llava-onevision-checkpoint"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_checkpoint_folder_loads_with_its_processor_options(checkpoint, ov_model):
    """A `save_pretrained` folder loads through from_pretrained with the processor's OneVision options
    (features per crop, max-9 cap, strategy): its prompts match the embedded model's token for token."""
    model, processor = load_model(str(checkpoint))
    assert (processor.num_image_tokens, processor.vision_aspect_ratio) == (729, "anyres_max_9")
    assert processor.vision_feature_select_strategy == "full" and model.config.model_type == "llava_onevision"
    batch = adapter_for(model).family.encode(processor, [picture(*LARGE)], [QUESTION])
    assert torch.equal(batch["input_ids"], encode(ov_model, LARGE)["input_ids"])


@pytest.fixture(scope="module")
def ov_engine(checkpoint, tmp_path_factory):
    """`capa-export build --model DIR --prune 2:0.3` (cpu profile: fp32; keep 30% of each image's
    patch tokens from layer 2, k computed from N inside the prefill graph), built once."""
    out = tmp_path_factory.mktemp("engines") / "onevision-cpu"
    assert main(["build", "--model", str(checkpoint), "--out", str(out), "--prune", f"2:{KEEP_FRACTION}"]) == 0
    return out


def expected_keep(num_candidates: int) -> int:
    """k for the engine's keep fraction, from its decimal definition: round(f * N), halves up, >= 1."""
    return max(1, math.floor(Fraction(KEEP_FRACTION) * num_candidates + Fraction(1, 2)))


@pytest.mark.slow
def test_checkpoint_directory_builds_a_validated_engine(ov_engine):
    manifest = json.loads((ov_engine / "manifest.json").read_text())
    validation = json.loads((ov_engine / "validation.json").read_text())
    assert manifest["complete"] and validation["passed"] and manifest["model"]["family"] == "llava_onevision"
    assert all(e["agreement"] == 1.0 for e in validation["end_to_end"])
    assert manifest["vision_dims"]["crops"] == [2, 37, 37]
    assert manifest["capa_config"]["prune_layout_tokens"] is False


@pytest.mark.slow
@pytest.mark.parametrize("size", [WIDE, TALL])
def test_engine_equals_the_capa_model_on_two_aspect_ratios(ov_engine, checkpoint, size):
    """Kept indices exact (k the fraction of the image's own patch tokens), greedy tokens equal, on a
    wide and a tall picture."""
    from capa_export.pipeline import load_calibration

    model, processor = load_model(str(checkpoint))
    config, approx = load_calibration(model, ov_engine / "calibration")
    capa = apply_capa(model, config, approx)
    batch = capa.family.encode(processor, [picture(*size, seed=5)], ["Which colours are there?"])
    expected, prefill = capa.generate(**batch, max_new_tokens=5)
    with CapaEngine(ov_engine) as engine:
        tokens, keep, _ = engine.generate_ids(batch, max_new_tokens=5)
    assert keep.tolist() == prefill.keep_indices.tolist()
    assert keep.shape == (1, expected_keep(hf_patch_tokens(model, batch)))
    assert tokens.tolist() == expected.tolist()


@pytest.mark.slow
def test_engine_refuses_a_prompt_longer_than_its_profile(ov_engine):
    """The large picture's 7,309 image tokens exceed the cpu profile's 2,048-token sequence: refused
    in one line naming shapes.sequence, before any graph runs."""
    with CapaEngine(ov_engine) as engine:
        batch = engine.prepare([picture(*LARGE)], ["What?"])
        with pytest.raises(CapaError, match="shapes.sequence"):
            engine.generate_ids(batch, max_new_tokens=2)
