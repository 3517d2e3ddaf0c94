"""Bad input around engines: one line, exit status 2, nothing overwritten or half-written."""

import json
import shutil

import pytest

from capa_export.backends.trt import check_topk_limit
from capa_export.cli import main
from capa_export.config import CapaConfig
from capa_export.errors import CapaError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def engine_copy(cpu_engine, tmp_path):
    target = tmp_path / "engine"
    shutil.copytree(cpu_engine[0], target)
    return target


def edit_manifest(engine, change):
    path = engine / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_run_and_validate_a_built_engine(cpu_engine, capsys):
    code, out, err = run(capsys, "run", cpu_engine[0], "--max-new-tokens", "4")
    assert code == 0 and "prefill" in err and "kept 64 visual tokens" in err
    code, out, _ = run(capsys, "validate", cpu_engine[0], "--tokens", "4")
    assert code == 0 and "validation PASSED" in out


def test_corrupted_file(engine_copy, capsys):
    data = engine_copy / "onnx" / "weights.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "does not match its sha256" in err and len(err.strip().splitlines()) == 1


def test_missing_file(engine_copy, capsys):
    (engine_copy / "onnx" / "decode.onnx").unlink()
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "decode.onnx is missing" in err


def test_manifest_from_a_newer_tool(engine_copy, capsys):
    edit_manifest(engine_copy, lambda m: m.update(format_version=99, tool={"name": "capa-export", "version": "9.0"}))
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "upgrade capa-export" in err


def test_incomplete_engine_is_refused(engine_copy, capsys):
    edit_manifest(engine_copy, lambda m: m.update(complete=False))
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "not complete" in err


def test_prompt_longer_than_the_profile(engine_copy, capsys):
    edit_manifest(engine_copy, lambda m: m["profile"]["shapes"].update(sequence=[8, 64, 100]))
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "allows at most 100" in err


@pytest.mark.parametrize("toml, message", [
    ('[shapes]\nbatch = [4, 2, 8]\n', "must satisfy 1 <= min <= opt <= max"),
    ('precision = "fp8"\n', "precision 'fp8'"),
    ('prune = [[2, 600]]\n', "k must be in [1, 576]"),
    ('workspace = 3\n', "unknown field"),
    ('attention_blocks = 0\n', "attention_blocks = 0 must be an integer from 1 to 64"),
    ('attention = "explicit"\nattention_blocks = 4\n', "needs fused attention"),
    ('attention_blocks = 16\n[shapes]\nsequence = [8, 640, 2048]\n', "exceeds the shortest prompt shapes.sequence[0] = 8"),
])
def test_bad_profiles_write_nothing(tmp_path, capsys, toml, message):
    profile = tmp_path / "bad.toml"
    profile.write_text(toml)
    out = tmp_path / "engines"
    code, _, err = run(capsys, "build", "--profile", profile, "--out", out / "x")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--attention-blocks", "0"], "--attention-blocks = 0 must be an integer from 1 to 64"),
    (["--attention", "explicit", "--attention-blocks", "8"], "needs fused attention"),
])
def test_bad_attention_blocks_write_nothing(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "export", *argv, "--out", tmp_path / "onnx")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists()


def test_unknown_profile_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "build", "--profile", "laptop")
    assert code == 2 and "cpu, datacenter, edge" in err


def test_tensorrt_missing_is_one_clear_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: this test covers its absence")
    code, _, err = run(capsys, "build", "--backend", "tensorrt", "--out", tmp_path / "x")
    assert code == 2 and "TensorRT is not installed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_missing_plugin_library(tmp_path, capsys):
    code, _, err = run(capsys, "build", "--plugin-library", tmp_path / "nope.so", "--out", tmp_path / "x")
    assert code == 2 and "nope.so does not exist" in err
    assert not (tmp_path / "x").exists()


def test_topk_limit_for_tensorrt_standard_op_lowering():
    check_topk_limit(CapaConfig(prune=[(2, 3840)]), "inline", plugin_loaded=False)
    check_topk_limit(CapaConfig(prune=[(2, 4000)]), "function", plugin_loaded=True)  # the plugin has no such limit
    with pytest.raises(CapaError, match="TopK limit of 3840, which --pruning inline uses"):
        check_topk_limit(CapaConfig(prune=[(2, 4000)]), "inline", plugin_loaded=True)
    with pytest.raises(CapaError, match="TopK limit of 3840, which the CapaContribTopK function body uses when the "
                                        "plugin is not loaded"):
        check_topk_limit(CapaConfig(prune=[(2, 4000)]), "function", plugin_loaded=False)


def test_build_refuses_a_device_it_would_ignore(tmp_path, capsys):
    code, _, err = run(capsys, "build", "--device", "cuda", "--out", tmp_path / "x")
    assert code == 2 and "--device cuda: build calibrates, exports" in err and "leave --device out" in err
    assert not (tmp_path / "x").exists()


def test_bf16_engine_is_refused_before_anything_is_written(tmp_path, capsys):
    code, _, err = run(capsys, "build", "--profile", "datacenter", "--backend", "onnxruntime", "--out", tmp_path / "x")
    assert code == 2 and "is bf16, which ONNX Runtime runs only with CUDAExecutionProvider" in err and "edge (fp16)" in err
    assert not (tmp_path / "x").exists()


def test_out_never_replaces_a_folder_that_is_not_ours(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for argv in (["export", "--out", precious], ["build", "--out", precious], ["calibrate", "--out", precious]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "is not a capa-export output" in err
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_files_not_in_the_manifest_are_refused(engine_copy, capsys):
    (engine_copy / "onnxruntime" / "extra.onnx").write_bytes(b"x")
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "does not list" in err and "extra.onnx" in err


def test_manifest_without_checksums_is_refused(engine_copy, capsys):
    edit_manifest(engine_copy, lambda m: m.pop("files"))
    code, _, err = run(capsys, "run", engine_copy)
    assert code == 2 and "key files is missing" in err


@pytest.mark.parametrize("mutate, message", [
    (lambda ids, mask: (ids, mask.__setitem__((slice(None), -1), 0)), "right padding"),
    (lambda ids, mask: None, "max_new_tokens=0"),
])
def test_runtime_refuses_what_it_cannot_serve(cpu_engine, llava, mutate, message):
    import numpy as np

    from capa_export.inputs import builtin_samples, encode
    from capa_export.models import adapter_for
    from capa_export.runtime import CapaEngine

    model, processor = llava
    batch = encode(adapter_for(model), processor, builtin_samples(1)[0])
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy().copy()
    mutate(ids, mask)
    tokens = 0 if "max_new" in message else 3
    with CapaEngine(cpu_engine[0], verify=False) as engine, pytest.raises(CapaError, match=message):
        engine.generate_ids({**batch, "input_ids": ids, "attention_mask": np.asarray(mask)}, max_new_tokens=tokens)


def test_tensorrt_shape_ranges_cover_decode_tokens(llava):
    from capa_export.contract import profile_ranges
    from capa_export.models import adapter_for
    from capa_export.profiles import BuildProfile

    profile = BuildProfile.load("edge")
    contract = adapter_for(llava[0]).family.graph_contract([0, 0, 1, 1, 1, 1, 1, 1])
    ranges = profile_ranges(contract["embed"], profile.shapes, {"visual_tokens": 576})
    ranges.update(profile_ranges(contract["decode"], profile.shapes, {"visual_tokens": 576}))
    assert ranges["input_ids"][0] == (1, 1)  # embed serves single decode tokens
    assert ranges["past.2.key"] == ((1, 2, 1, 32), (1, 2, 660, 32), (1, 2, 1536, 32))


@pytest.mark.parametrize("argv, message", [
    (["bench", "--batch", "0"], "--batch 0 must be >= 1"),
    (["bench", "--repeats", "0"], "--repeats 0 must be >= 1"),
    (["bench", "--keep", "1000", "--no-engine", "--repeats", "1"], "k must be in [1, 576]"),
])
def test_bench_bad_arguments(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_named_profiles_ship_with_the_package():
    """Named profiles are package data (found outside a source checkout, e.g. from a wheel)."""
    from importlib.resources import files

    from capa_export.profiles import BuildProfile

    shipped = files("capa_export") / "build_profiles"
    assert {p.name for p in shipped.iterdir() if p.name.endswith(".toml")} >= {"cpu.toml", "edge.toml", "datacenter.toml"}
    assert BuildProfile.load("cpu").source == str(shipped / "cpu.toml")
    with pytest.raises(CapaError, match="one of: cpu, datacenter, edge"):
        BuildProfile.load("laptop")


@pytest.mark.parametrize("argv, message", [
    (["--provider", "TensorrtExecutionProvider"], "provider 'TensorrtExecutionProvider' is not one this engine was built for"),
    (["--threads", "0"], "--threads 0 must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c", "--prompt", "d", "--prompt", "e"],
     "5 prompts exceed the engine's batch maximum 4"),
])
def test_run_refuses_what_it_cannot_serve_in_one_line(cpu_engine, capsys, argv, message):
    code, _, err = run(capsys, "run", cpu_engine[0], *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_run_images_and_prompts_of_different_counts(cpu_engine, capsys, tmp_path):
    from capa_export.inputs import synthetic_image

    for i in range(2):
        synthetic_image(i).save(tmp_path / f"{i}.png")
    code, _, err = run(capsys, "run", cpu_engine[0], "--image", tmp_path / "0.png", "--image", tmp_path / "1.png",
                       "--prompt", "a", "--prompt", "b", "--prompt", "c")
    assert code == 2 and "2 --image and 3 --prompt" in err


def test_run_a_jsonl_batch_prints_one_json_line_per_answer(cpu_engine, capsys, tmp_path):
    from capa_export.inputs import synthetic_image

    synthetic_image(0).save(tmp_path / "a.png")
    (tmp_path / "batch.jsonl").write_text('{"image": "a.png", "prompt": "What?"}\n{"image": "a.png", "prompt": "Why?"}\n')
    code, out, _ = run(capsys, "run", cpu_engine[0], "--jsonl", tmp_path / "batch.jsonl", "--json", "--max-new-tokens", "3")
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and [line["prompt"] for line in lines] == ["What?", "Why?"]
    assert all(len(line["tokens"]) <= 3 and line["answer"] is not None for line in lines)
