"""The Qwen-VL family beyond the model table (tests/test_model.py runs that on tiny-qwen2-vl and
tiny-qwen2.5-vl): the traceable vision tower against HF's own, M-RoPE positions against a
hand-computed layout, dynamic-resolution engines (ONNX Runtime CPU) built from a `save_pretrained`
checkpoint directory, and the bad inputs they refuse.

Independent references: HF's `get_image_features` and the positions HF's forward hands its decoder;
the M-RoPE layout written out from its definition; the CapaModel (itself tested against HF) for
engines."""

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from capa_export import CapaConfig, apply_capa
from capa_export.cli import main
from capa_export.errors import CapaError
from capa_export.models import adapter_for, load_model
from capa_export.runtime import CapaEngine

QWEN_MODELS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
KEEP_FRACTION = "0.3"  # of each image's visual tokens (k = 77 of 256, 154 of 512: rounding is exercised)


def picture(height, width, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=QWEN_MODELS)
def qwen(request):
    return load_model(request.param)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_image_features_equal_hf_for_two_images_of_different_sizes(qwen):
    """Per-image (and, in Qwen2.5-VL, per-window) attention expressed as a mask over all patches
    gives what HF's vision forward gives with its per-image split and window reordering."""
    model, processor = qwen
    pixels = processor.image_processor(images=[picture(300, 400), picture(520, 260, seed=1)], return_tensors="pt")
    assert pixels["image_grid_thw"][0].tolist() != pixels["image_grid_thw"][1].tolist()
    with torch.no_grad():
        expected = torch.cat(model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output)
        features = adapter_for(model).image_features(pixels["pixel_values"], pixels["image_grid_thw"])
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_mrope_positions_follow_the_image_grid(qwen):
    """Text counts up; an image of h x w tokens starting at s takes (s, s + i, s + j) for token
    (i, j); the text after it resumes at s + max(h, w). Left padding: padded slots are 0 and each
    row's real tokens are numbered from 0."""
    model, processor = qwen
    family = adapter_for(model).family
    batch = family.encode(processor, [picture(300, 400), picture(300, 400)], ["Hi?", "What is in the picture?"])
    positions = family.prefill_positions(batch)
    merge = model.config.vision_config.spatial_merge_size
    _, h, w = (int(x) // m for x, m in zip(batch["image_grid_thw"][0], (1, merge, merge)))
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real]
        image = (ids == family.image_token_id).nonzero()[:, 0]
        start = int(image[0])
        expected = torch.arange(len(ids)).expand(3, -1).clone()
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
        expected[:, image] = start + torch.cat([torch.zeros(1, h * w, dtype=torch.long), grid])
        after = int(image[-1]) + 1
        expected[:, after:] = start + max(h, w) + torch.arange(len(ids) - after)
        assert torch.equal(positions[:, row, real], expected)
        assert bool((positions[:, row, ~real] == 0).all())
    # decoding continues from the largest prompt position, on all three rows (HF's rope deltas)
    next_position = family.next_position(positions)
    assert torch.equal(family.decode_positions(next_position, 2)[:, :, 0], positions.amax(dim=(0, 2))[None].expand(3, 2) + 1)


def test_video_inputs_are_refused(qwen):
    model, processor = qwen
    family = adapter_for(model).family
    batch = family.encode(processor, [picture(300, 400)], ["What?"])
    with pytest.raises(CapaError, match="video inputs are not supported yet"):
        apply_capa(model, CapaConfig(prune=[]))(**batch, pixel_values_videos=torch.zeros(8, 1176),
                                                video_grid_thw=torch.tensor([[2, 2, 2]]))


def test_vision_graph_exports_with_dynamic_patches_and_images(qwen, tmp_path):
    """The exported vision graph, run by ONNX Runtime on image sizes and counts it was not traced
    with, equals HF's vision tower."""
    from capa_export.export.exporter import export_graphs

    model, processor = qwen
    capa = apply_capa(model, CapaConfig(prune=[(2, 64)]))
    export_graphs(capa, processor, tmp_path, "onnx", progress=False, graphs=("vision",))
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    for images in ([picture(640, 480, seed=2)], [picture(200, 500, seed=3), picture(470, 470, seed=4)]):
        pixels = processor.image_processor(images=images, return_tensors="pt")
        (features,) = session.run(None, {"pixel_values": pixels["pixel_values"].numpy(),
                                         "image_grid_thw": pixels["image_grid_thw"].numpy()})
        with torch.no_grad():
            expected = torch.cat(model.model.get_image_features(pixels["pixel_values"],
                                                                pixels["image_grid_thw"]).pooler_output)
        np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_dimension_ranges_follow_the_profile_pixels():
    model, processor = load_model("tiny-qwen2.5-vl")
    family = adapter_for(model).family
    low, high = 256 * 28 * 28, 512 * 28 * 28  # the tiny processor's min_pixels / max_pixels
    assert family.visual_token_range(processor) == (256, 512)
    assert family.dim_ranges(processor, {})["visual_tokens"] == (256, 256, 512)
    dims = family.dim_ranges(processor, {"pixels": (300 * 28 * 28, 320 * 28 * 28, 10**7)})
    assert dims == {"pixels": (300 * 784, 320 * 784, high), "visual_tokens": (300, 320, 512),
                    "patches": (1200, 1280, 2048)}
    with pytest.raises(CapaError, match=f"outside the image processor's range \\[{low}, {high}\\]"):
        family.dim_ranges(processor, {"pixels": (10, 20, 30)})


# --- engines ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-qwen2.5-vl saved as a checkpoint directory (random weights + processor), as a user has one."""
    model, processor = load_model("tiny-qwen2.5-vl")
    directory = tmp_path_factory.mktemp("checkpoint") / "qwen-checkpoint"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qwen_engine(checkpoint, tmp_path_factory):
    """`capa-export build --model DIR --prune 2:0.25` (cpu profile: fp32; keep a quarter of each
    image's visual tokens from layer 2: k computed from N inside the prefill graph), built once.
    (The LLaVA engines of test_engine.py keep a count.)"""
    out = tmp_path_factory.mktemp("engines") / "qwen-cpu"
    assert main(["build", "--model", str(checkpoint), "--out", str(out), "--prune", f"2:{KEEP_FRACTION}"]) == 0
    return out


def expected_keep(num_visual: int) -> int:
    """k for the engine's keep fraction, from its decimal definition: round(f * N), halves up, >= 1."""
    return max(1, math.floor(Fraction(KEEP_FRACTION) * num_visual + Fraction(1, 2)))


def visual_tokens(batch, processor) -> int:
    return int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_checkpoint_directory_builds_a_validated_engine(qwen_engine):
    manifest = json.loads((qwen_engine / "manifest.json").read_text())
    validation = json.loads((qwen_engine / "validation.json").read_text())
    assert manifest["complete"] and validation["passed"] and manifest["model"]["family"] == "qwen2_5_vl"
    assert all(e["agreement"] == 1.0 for e in validation["end_to_end"])
    # the manifest records the pixel range and the visual tokens and patches it gives
    assert manifest["vision_dims"] == {"pixels": [200704, 200704, 401408], "visual_tokens": [256, 256, 512],
                                       "patches": [1024, 1024, 2048]}


@pytest.mark.parametrize("size", [(300, 400), (620, 500)])
def test_engine_equals_the_capa_model_on_new_image_sizes(qwen_engine, checkpoint, size):
    """Sizes the engine was neither traced nor validated with: kept indices exact, greedy tokens equal."""
    from capa_export.pipeline import load_calibration

    model, processor = load_model(str(checkpoint))
    config, approx = load_calibration(model, qwen_engine / "calibration")
    capa = apply_capa(model, config, approx)
    batch = capa.family.encode(processor, [picture(*size, seed=5)], ["Which colours are there?"])
    expected, prefill = capa.generate(**batch, max_new_tokens=5)
    with CapaEngine(qwen_engine) as engine:
        tokens, keep, _ = engine.generate_ids(batch, max_new_tokens=5)
    assert keep.tolist() == prefill.keep_indices.tolist()
    assert keep.shape == (1, expected_keep(visual_tokens(batch, processor)))
    assert tokens.tolist() == expected.tolist()


def test_run_prints_an_answer(qwen_engine, checkpoint, tmp_path, capsys):
    """The k computed inside the engine for this image is the fraction's, from the image's own N."""
    image = picture(448, 700, seed=3)
    image.save(tmp_path / "image.png")
    code, out, err = run_cli(capsys, "run", qwen_engine, "--image", tmp_path / "image.png", "--max-new-tokens", "3")
    _, processor = load_model(str(checkpoint))
    num_visual = visual_tokens(adapter_free_encode(processor, image), processor)
    assert code == 0 and out.strip() and f"kept {expected_keep(num_visual)} visual tokens" in err


def adapter_free_encode(processor, image):
    """The processor's own encoding of one image + question (no capa-export code)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[prompt], return_tensors="pt")


def test_image_outside_the_engine_pixel_range_is_refused(qwen_engine, tmp_path, capsys):
    engine = tmp_path / "engine"
    shutil.copytree(qwen_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["vision_dims"]["pixels"] = [200704, 200704, 250000]  # as a profile with shapes.pixels max 250000 makes
    (engine / "manifest.json").write_text(json.dumps(manifest))
    image = tmp_path / "large.png"
    picture(480, 640).save(image)
    code, _, err = run_cli(capsys, "run", engine, "--image", image)
    assert code == 2 and "outside the engine's pixel range [200704, 250000]" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def test_video_file_is_refused(qwen_engine, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    code, _, err = run_cli(capsys, "run", qwen_engine, "--image", clip)
    assert code == 2 and "video inputs are not supported yet" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_two_images_where_the_engine_takes_one(qwen_engine, checkpoint):
    _, processor = load_model(str(checkpoint))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=[picture(300, 400), picture(300, 400, seed=1)], text=[prompt], return_tensors="pt")
    with CapaEngine(qwen_engine) as engine, pytest.raises(CapaError, match="holds 2 images for 1 prompt"):
        engine.generate_ids(dict(batch), max_new_tokens=2)


@pytest.mark.parametrize("toml, message", [
    ("prune = [[2, 300]]\n", "keeps k=300 but the smallest image the profile allows (200704 pixels, shapes.pixels) "
                             "gives only 256 visual tokens"),
    ("[shapes]\npixels = [10, 20, 30]\n", "outside the image processor's range [200704, 401408]"),
])
def test_bad_profiles_for_dynamic_resolution(tmp_path, capsys, toml, message):
    profile = tmp_path / "bad.toml"
    profile.write_text('backend = "onnxruntime"\n' + toml)
    code, _, err = run_cli(capsys, "build", "--model", "tiny-qwen2.5-vl", "--profile", profile, "--out", tmp_path / "x")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_standard_op_lowering_matches_the_capa_model(qwen_engine, checkpoint, tmp_path):
    """The prefill with the selection inlined (standard ops only), M-RoPE rows gathered in the graph,
    on a left-padded batch of two prompts."""
    from capa_export.export.exporter import export_model
    from capa_export.export.graphs import graph_inputs
    from capa_export.pipeline import load_calibration
    from capa_export.validate import to_feed

    model, processor = load_model(str(checkpoint))
    config, approx = load_calibration(model, qwen_engine / "calibration")
    export_model(model, processor, config, approx, tmp_path / "onnx", pruning="inline", progress=False, graphs=("prefill",))
    prefill = tmp_path / "onnx" / "prefill.onnx"
    capa = apply_capa(model, config, approx)
    batch = capa.family.encode(processor, [picture(336, 336, seed=6), picture(336, 336, seed=7)],
                               ["What?", "Which colours are there?"])
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    contract = capa.family.graph_contract(capa.layer_segments())
    feed = to_feed(contract["prefill"], graph_inputs(capa, batch)["prefill"], "fp32")
    assert feed["position_ids"].shape[0] == 3
    session = ort.InferenceSession(str(prefill), providers=["CPUExecutionProvider"])
    logits, keep = session.run(["logits", "keep_indices"], feed)
    expected = capa(**batch, last_logits_only=True)
    assert keep.tolist() == expected.keep_indices.tolist()
    np.testing.assert_allclose(logits, expected.logits[:, -1].numpy(), rtol=1e-4, atol=1e-4)


def test_fp16_engine_of_the_embedded_model_validates(tmp_path, capsys):
    """`capa-export build --model tiny-qwen2.5-vl --profile edge`: fp16 graphs (ONNX Runtime CPU
    where TensorRT is absent), within the fp16 tolerance, 90% teacher-forced agreement at least."""
    code, out, _ = run_cli(capsys, "build", "--model", "tiny-qwen2.5-vl", "--profile", "edge", "--backend",
                           "onnxruntime", "--out", tmp_path / "edge")
    assert code == 0 and "validation PASSED (fp16, onnxruntime)" in out
    manifest = json.loads((tmp_path / "edge" / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["complete"]


def test_tensorrt_profile_follows_the_pixel_range():
    """The optimisation-profile shapes TensorRT would get (computed without TensorRT): patches and
    visual tokens from the pixel range, M-RoPE positions with their three rows."""
    from capa_export.contract import profile_ranges
    from capa_export.profiles import BuildProfile

    model, processor = load_model("tiny-qwen2.5-vl")
    family = adapter_for(model).family
    profile = BuildProfile.load("edge")
    dims = family.dim_ranges(processor, profile.shapes)
    contract = family.graph_contract([0, 0, 1, 1, 1, 1, 1, 1])
    vision = profile_ranges(contract["vision"], profile.shapes, dims)
    assert vision["pixel_values"] == ((1024, 1176), (1024, 1176), (2048, 1176))
    assert vision["image_grid_thw"] == ((1, 3), (1, 3), (1, 3))
    prefill = profile_ranges(contract["prefill"], profile.shapes, dims)
    assert prefill["visual_positions"] == ((1, 256), (1, 256), (1, 512))
    assert prefill["position_ids"] == ((3, 1, 8), (3, 1, 620), (3, 1, 1024))
