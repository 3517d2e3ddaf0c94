"""Engine folders are untrusted input: attacks on copies of one built engine, through the CLI.

Every attack ends the same way: exit status 2; one line on stderr naming the problem; no file
outside the engine folder opened for writing (an audit hook sees every open Python makes: a write
outside is allowed only as a brand-new file, O_CREAT|O_EXCL, never an existing file or a link);
no sentinel outside the folder opened at all; the sentinels' bytes unchanged; no marker file
written by code planted in the folder. The reference for "refused" is the attack itself: each
planted folder is one the tool accepted, or crashed on, before these checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from capa_export.cli import main

# --- observing what the tool opens ---------------------------------------------------------------
_OPENED: list | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open":
        _OPENED.append(args)


sys.addaudithook(_audit)  # inert unless a test records (audit hooks cannot be removed)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
SENTINEL_DIR = "outside-sentinel"


def _writes(mode, flags) -> bool:
    return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(isinstance(flags, int) and flags & _WRITE_FLAGS)


def _creates_only_new(mode, flags) -> bool:
    """An open that can only create a new file: never truncates an existing one, never follows a link."""
    if isinstance(mode, str):
        return "x" in mode
    return bool(flags & os.O_CREAT and flags & os.O_EXCL)


def run_cli(capsys, *argv):
    """(exit status, stderr, [(path, mode, flags) of every open]) of `capa-export argv`."""
    global _OPENED
    _OPENED = []
    try:
        code = main([str(a) for a in argv])
    finally:
        opened, _OPENED = _OPENED, None
    return code, capsys.readouterr().err, opened


def assert_refused(result, scene, *words):
    code, err, opened = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    engine = str(scene.engine.resolve())
    for path, mode, flags in opened:
        if not isinstance(path, (str, bytes, os.PathLike)):
            continue  # an fd
        path = os.fsdecode(path)
        assert SENTINEL_DIR not in path, f"opened {path} outside the engine folder"
        if _writes(mode, flags) and os.path.isabs(path) and not path.startswith(engine + os.sep):
            assert _creates_only_new(mode, flags), f"opened {path} for writing outside the engine folder"
    for sentinel, digest in scene.sentinels.items():
        assert hashlib.sha256(sentinel.read_bytes()).hexdigest() == digest, f"{sentinel} was modified"
    assert not scene.marker.exists(), "code planted in the folder ran"


# --- the scene: a copy of the built engine, sentinels outside it ---------------------------------
def copy_engine(source: Path, target: Path) -> Path:
    """A full copy of a built engine (no hard links: onnx refuses external data with several links,
    which would break every later user of the shared engine while a copy exists)."""
    shutil.copytree(source, target, symlinks=True)
    return target


def replace_file(path: Path, data: bytes) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)


def read_manifest(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def write_manifest(engine: Path, manifest: dict) -> None:
    replace_file(engine / "manifest.json", json.dumps(manifest, indent=2).encode())


def retable(engine: Path, extra: dict | None = None) -> None:
    """What an attacker does after changing a file: recompute the manifest's sha256 table (links
    are read through, as the old table walk did)."""
    manifest = read_manifest(engine)
    files = {}
    for name in manifest["files"]:
        path = engine / name
        if path.exists():
            data = path.read_bytes()
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for name, data in (extra or {}).items():
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"] = files
    write_manifest(engine, manifest)


@pytest.fixture
def scene(cpu_engine, tmp_path):
    outside = tmp_path / SENTINEL_DIR
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"not for the engine's eyes\n")
    victim = outside / "victim.sh"
    victim.write_bytes(b"#!/bin/sh\necho precious\n")
    engine = copy_engine(cpu_engine[0], tmp_path / "engine")
    yield SimpleNamespace(engine=engine, outside=outside, secret=secret, victim=victim,
                          marker=tmp_path / "planted-code-ran",
                          sentinels={p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (secret, victim)})
    shutil.rmtree(engine, ignore_errors=True)  # a copy per test: give the disk back


def test_an_untouched_copy_runs(scene, capsys):
    """The reference: the copy every attack starts from is accepted (so each refusal is the attack's)."""
    code, err, opened = run_cli(capsys, "run", scene.engine, "--max-new-tokens", "2")
    assert code == 0, err
    assert not any(_writes(m, f) and isinstance(p, str) and p.startswith(str(scene.engine)) for p, m, f in opened)


# --- 1. writes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".manifest.json.tmp", ".validation.json.tmp"])
def test_validate_never_writes_through_a_link_planted_at_a_temporary_name(scene, capsys, name):
    (scene.engine / name).symlink_to(scene.victim)
    assert_refused(run_cli(capsys, "validate", scene.engine, "--tokens", "2"), scene, name, "hidden entry")


def test_a_second_writer_is_refused_while_validate_holds_the_folder(scene, capsys):
    from capa_export.folders import folder_lock

    with folder_lock(scene.engine):  # another process validating the same folder
        result = run_cli(capsys, "validate", scene.engine, "--tokens", "2")
    assert_refused(result, scene, "being written by another capa-export process")


# --- 2. native code ------------------------------------------------------------------------------
def planted_library(path: Path, marker: Path) -> bytes:
    """A shared library whose constructor writes marker (a plain file when no C compiler is here)."""
    source = path.with_suffix(".c")
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or subprocess.run([compiler, "-shared", "-fPIC", "-o", str(path), str(source)]).returncode:
        path.write_bytes(b"\x7fELF not really")
    source.unlink()
    return path.read_bytes()


def tensorrt_folder(scene, description: dict) -> None:
    """The engine turned into a TensorRT one, carrying a plugin library of its own."""
    engine = scene.engine
    shutil.rmtree(engine / "onnxruntime")
    (engine / "tensorrt").mkdir()
    files = {f"tensorrt/{g}.plan": b"plan" for g in ("vision", "embed", "prefill", "decode")}
    for name, data in files.items():
        (engine / name).write_bytes(data)
    library = planted_library(engine / "tensorrt" / "libcapa_contrib_topk_plugin.so", scene.marker)
    files["tensorrt/libcapa_contrib_topk_plugin.so"] = library
    files["tensorrt/tensorrt.json"] = json.dumps(description).encode()
    (engine / "tensorrt" / "tensorrt.json").write_bytes(files["tensorrt/tensorrt.json"])
    manifest = read_manifest(engine)
    manifest.update(backend="tensorrt", backend_dir="tensorrt")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("onnxruntime/")}
    write_manifest(engine, manifest)
    retable(engine, files)


PLUGIN = {"name": "CapaContribTopK", "version": "1", "namespace": "capa", "library_sha256": "0" * 64}
TRT_GRAPHS = {g: f"{g}.plan" for g in ("vision", "embed", "prefill", "decode")}


@pytest.mark.parametrize("description, words", [
    ({"backend": "tensorrt", "graphs": TRT_GRAPHS, "embedded_plugins": False,
      "plugin": {**PLUGIN, "library": "libcapa_contrib_topk_plugin.so"}}, ["plugin"]),
    ({"backend": "tensorrt", "graphs": TRT_GRAPHS, "embedded_plugins": False, "plugin": PLUGIN,
      "plugin_library": "/outside/libevil.so"}, ["plugin_library is unknown"]),
    ({"backend": "tensorrt", "graphs": {**TRT_GRAPHS, "decode": "../tensorrt/decode.plan"}, "embedded_plugins": False,
      "plugin": PLUGIN}, ["graphs.decode", "plain file name"]),
], ids=["library-in-folder", "library-outside", "plan-path"])
def test_a_tensorrt_folder_never_names_native_code(scene, capsys, description, words):
    """Refused from tensorrt.json alone, before TensorRT is needed: the plugin library is the one
    installed with capa-export (or named by the user), never one the folder names or carries."""
    tensorrt_folder(scene, description)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "tensorrt.json", *words)


def test_a_tensorrt_folder_is_checked_before_tensorrt_is_needed(scene, capsys):
    """A well-formed TensorRT folder that carries a library: its description was read and checked
    (so a hostile one is refused the same way with or without TensorRT), then, without TensorRT,
    one line saying so, and the carried library never loaded. With TensorRT: not exercised here."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: this covers its absence")
    description = {"backend": "tensorrt", "graphs": TRT_GRAPHS, "embedded_plugins": False, "plugin": PLUGIN}
    tensorrt_folder(scene, description)
    from capa_export.backends import trt

    files = {k.split("/", 1)[1]: v for k, v in read_manifest(scene.engine)["files"].items() if k.startswith("tensorrt/")}
    assert trt.check_folder(scene.engine / "tensorrt", files) == description  # needs no TensorRT
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "TensorRT is not installed")


# --- 3. code and models named by the folder ------------------------------------------------------
PLANTED_MODULE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("config, with_code, words", [
    ("processor_config.json", True, ["planted.py", "not a processor file"]),
    ("processor_config.json", False, ["auto_map", "custom code"]),
    ("tokenizer_config.json", False, ["auto_map", "custom code"]),
], ids=["module-file", "auto-map-processor", "auto-map-tokenizer"])
def test_processor_code_is_refused_and_never_runs(scene, capsys, config, with_code, words):
    processor = scene.engine / "processor"
    data = json.loads((processor / config).read_text())
    data["auto_map"] = {"AutoProcessor": "planted.PlantedProcessor", "AutoTokenizer": ["planted.PlantedTokenizer", None]}
    replace_file(processor / config, json.dumps(data).encode())
    extra = {}
    if with_code:
        extra["processor/planted.py"] = PLANTED_MODULE.format(marker=str(scene.marker)).encode()
        (processor / "planted.py").write_bytes(extra["processor/planted.py"])
    retable(scene.engine, extra)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, *words)


def test_a_sandboxed_chat_template_is_one_line(scene, capsys):
    template = scene.engine / "processor" / "chat_template.jinja"
    replace_file(template, b"{{ ''.__class__.__mro__[1].__subclasses__() }}")
    retable(scene.engine)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "chat template", "SecurityError")


@pytest.mark.parametrize("name", ["local-path", "hub-id"])
def test_validate_never_loads_the_model_a_manifest_names(scene, capsys, name):
    model_dir = scene.outside / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llava"}))
    manifest = read_manifest(scene.engine)
    manifest["model"]["name"] = str(model_dir) if name == "local-path" else "someone/some-model"
    write_manifest(scene.engine, manifest)
    assert_refused(run_cli(capsys, "validate", scene.engine), scene, "does not load on the folder's word", "--model")


# --- 4. paths read from JSON ---------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../outside-sentinel/secret.bin", "ABSOLUTE", "onnx/../onnx/export.json",
                                   "onnx//export.json", "./onnx/export.json"],
                         ids=["dotdot", "absolute", "alias-dotdot", "alias-empty", "alias-dot"])
def test_file_table_entries_outside_or_aliased_are_refused_unread(scene, capsys, entry):
    """Each entry names a file whose size and sha256 it gives correctly: refused by name, unread."""
    entry = str(scene.secret) if entry == "ABSOLUTE" else entry
    target = scene.secret if "secret" in entry else scene.engine / "onnx" / "export.json"
    data = target.read_bytes()
    manifest = read_manifest(scene.engine)
    manifest["files"][entry] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(scene.engine, manifest)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "manifest.json: files has a key",
                   "relative path inside the folder")


def outside_backend(scene) -> Path:
    """A complete copy of the backend folder outside the engine, as an attacker would point at."""
    copy = scene.outside / "onnxruntime"
    copy_engine(scene.engine / "onnxruntime", copy)
    return copy


@pytest.mark.parametrize("backend_dir, words", [
    ("../outside-sentinel/onnxruntime", ["backend_dir", "directory name"]),
    ("ABSOLUTE", ["backend_dir", "directory name"]),
    ("onnx", ["backend_dir must be 'onnxruntime'"]),
], ids=["dotdot", "absolute", "another-folder"])
def test_backend_dir_is_the_backends_own_folder(scene, capsys, backend_dir, words):
    copy = outside_backend(scene)
    manifest = read_manifest(scene.engine)
    manifest["backend_dir"] = str(copy) if backend_dir == "ABSOLUTE" else backend_dir
    write_manifest(scene.engine, manifest)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, *words)


@pytest.mark.parametrize("path, words", [
    ("../../outside-sentinel/onnxruntime/vision.opt.onnx", ["graphs.vision", "plain file name"]),
    ("ABSOLUTE", ["graphs.vision", "plain file name"]),
    ("../onnx/vision.onnx", ["graphs.vision", "plain file name"]),
], ids=["dotdot", "absolute", "another-folder"])
def test_session_graph_paths_stay_in_the_backend_folder(scene, capsys, path, words):
    copy = outside_backend(scene)
    session = scene.engine / "onnxruntime" / "session.json"
    description = json.loads(session.read_text())
    description["graphs"]["vision"] = str(copy / "vision.opt.onnx") if path == "ABSOLUTE" else path
    replace_file(session, json.dumps(description).encode())
    retable(scene.engine)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "session.json", *words)


@pytest.mark.parametrize("what", ["file", "directory"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_links_are_never_followed(scene, capsys, what, verify):
    """A link to a copy with the very same bytes: the table matches, the link is still refused."""
    if what == "file":
        original = scene.engine / "onnx" / "export.json"
        shutil.copy2(original, scene.outside / "export.json")
        original.unlink()
        original.symlink_to(scene.outside / "export.json")
    else:
        shutil.move(scene.engine / "processor", scene.outside / "processor")
        (scene.engine / "processor").symlink_to(scene.outside / "processor", target_is_directory=True)
    argv = ["run", scene.engine] + ([] if verify else ["--no-verify"])
    assert_refused(run_cli(capsys, *argv), scene, "symbolic link")


@pytest.mark.parametrize("plant, words", [
    ("hidden", ["hidden entry"]),
    ("fifo", ["special file"]),
    ("many", ["more than 10000 entries"]),
])
def test_what_the_old_table_walk_skipped_is_refused(scene, capsys, plant, words):
    if plant == "hidden":
        (scene.engine / "onnx" / ".planted.onnx").write_bytes(b"graph")
    elif plant == "fifo":
        os.mkfifo(scene.engine / "onnx" / "pipe")
    else:
        crowd = scene.engine / "onnx" / "crowd"
        crowd.mkdir()
        for i in range(10_001):
            (crowd / f"{i}.txt").touch()
    assert_refused(run_cli(capsys, "run", scene.engine), scene, *words)


def set_external_location(graph: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    replace_file(graph, model.SerializeToString())


@pytest.mark.parametrize("location, words", [
    ("../../outside-sentinel/secret.bin", ["contains '..'"]),
    ("ABSOLUTE", ["is absolute"]),
    ("absent.data", ["does not exist"]),
], ids=["dotdot", "absolute", "missing"])
def test_external_data_stays_in_the_folder(scene, capsys, location, words):
    graph = scene.engine / "onnxruntime" / "vision.opt.onnx"
    set_external_location(graph, str(scene.secret) if location == "ABSOLUTE" else location)
    retable(scene.engine)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "vision.opt.onnx", *words)


# --- 5 and 6. one line, bounded resources --------------------------------------------------------
def test_an_oversized_manifest_is_refused_before_it_is_read(scene, capsys):
    data = (scene.engine / "manifest.json").read_bytes()
    replace_file(scene.engine / "manifest.json", data[:-2] + b" " * (17 << 20) + data[-2:])  # valid JSON, 17 MiB
    assert_refused(run_cli(capsys, "run", scene.engine), scene, "manifest.json", "at most")


@pytest.mark.parametrize("depth", [100_000, 70])
@pytest.mark.parametrize("file", ["manifest.json", "onnxruntime/session.json"])
def test_deeply_nested_json_is_one_line(scene, capsys, depth, file):
    path = scene.engine / file
    text = path.read_text().rstrip()
    replace_file(path, (text[:-1] + ', "nested": ' + "[" * depth + "]" * depth + "}").encode())
    if file != "manifest.json":
        retable(scene.engine)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, file.split("/")[-1], "nests deeper than 64")


@pytest.mark.parametrize("change, words", [
    (lambda m: m["files"]["onnx/export.json"].update(bytes="12"), ['files["onnx/export.json"].bytes', "integer"]),
    (lambda m: m.pop("k"), ["key k is missing"]),
    (lambda m: m["profile"]["shapes"].update(sequence="long"), ["shapes.sequence", "[min, opt, max]"]),
    (lambda m: m.update(layer_segment=5), ["layer_segment", "segment indices"]),
    (lambda m: m["model"].pop("hidden_size"), ["model.hidden_size is missing"]),
    (lambda m: m["model"].pop("image_size"), ["'image_size' is missing"]),
    (lambda m: m["capa_config"].update(queries=3), ["capa_config.queries", "string"]),
    (lambda m: m.update(complete="yes"), ["complete", "true or false"]),
], ids=["bytes-string", "k-missing", "shape-string", "segments-int", "hidden-missing", "family-key-missing",
        "queries-int", "complete-string"])
def test_wrong_types_and_missing_keys_are_one_line(scene, capsys, change, words):
    manifest = read_manifest(scene.engine)
    change(manifest)
    write_manifest(scene.engine, manifest)
    assert_refused(run_cli(capsys, "run", scene.engine), scene, *words)


def add_graph_output(graph: Path, name: str, *, as_input: bool = False) -> None:
    """An extra ConstantOfShape output (the real attack asks for gigabytes; a small one suffices to
    be refused), or an extra input."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(graph), load_external_data=False)
    if as_input:
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]))
    else:
        shape = helper.make_tensor(f"{name}_shape", TensorProto.INT64, [1], [16])
        model.graph.node.append(helper.make_node("ConstantOfShape", [f"{name}_shape"], [name]))
        model.graph.initializer.append(shape)
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [16]))
    replace_file(graph, model.SerializeToString())


@pytest.mark.parametrize("graph, as_input", [("prefill", False), ("vision", True)], ids=["output", "input"])
def test_graph_inputs_and_outputs_match_the_family_before_sessions_exist(scene, capsys, graph, as_input):
    add_graph_output(scene.engine / "onnxruntime" / f"{graph}.opt.onnx", "planted", as_input=as_input)
    retable(scene.engine)
    words = ["prefill.opt.onnx", "has an output 'planted'"] if not as_input else ["vision.opt.onnx", "has an input"]
    assert_refused(run_cli(capsys, "run", scene.engine), scene, *words)


def test_sessions_made_before_a_failure_are_released(scene, monkeypatch):
    """The decode graph is refused after three sessions were activated: none stays active."""
    from capa_export.backends import ort as ort_backend
    from capa_export.errors import CapaError
    from capa_export.runtime import CapaEngine

    add_graph_output(scene.engine / "onnxruntime" / "decode.opt.onnx", "planted")
    retable(scene.engine)
    made = []
    real = ort_backend.OrtGraph.__init__

    def record(graph, *args, **kwargs):
        real(graph, *args, **kwargs)
        made.append(graph)

    monkeypatch.setattr(ort_backend.OrtGraph, "__init__", record)
    with pytest.raises(CapaError, match="has an output 'planted'"):
        CapaEngine(scene.engine)
    assert len(made) == 3 and all(graph.session is None for graph in made)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with one tiny (truncated) data chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, cap", [(20_000, 20_000, None), (12_000, 12_000, None), (40, 30, 1000)],
                         ids=["400MP", "144MP", "configured-cap"])
def test_images_are_refused_from_their_header(scene, capsys, width, height, cap):
    image = scene.outside.parent / "bomb.png"
    if cap is None:
        image.write_bytes(png_claiming(width, height))
    else:
        from PIL import Image

        Image.new("RGB", (width, height)).save(image)
    argv = ["run", scene.engine, "--image", image] + ([] if cap is None else ["--max-image-pixels", cap])
    assert_refused(run_cli(capsys, *argv), scene, "bomb.png", "pixels", "at most")


# --- signatures ----------------------------------------------------------------------------------
def test_build_signed_the_shared_engine(cpu_engine, signing_keys):
    """`build --sign` (the session's engine was built with sign_key): the signature verifies and
    covers the final manifest (build_seconds is written before signing)."""
    from capa_export.signing import verify_folder

    manifest = verify_folder(cpu_engine[0], signing_keys[1])
    assert manifest["complete"] and manifest["build_seconds"] is not None


def test_a_signed_engine_runs_with_trust(scene, capsys, signing_keys):
    code, err, _ = run_cli(capsys, "run", scene.engine, "--trust", signing_keys[1], "--max-new-tokens", "2")
    assert code == 0, err


def test_tampering_that_recomputes_the_table_is_caught_by_the_signature(scene, capsys, signing_keys):
    session = scene.engine / "onnxruntime" / "session.json"
    description = json.loads(session.read_text())
    description["load_with"] = "something else"
    replace_file(session, json.dumps(description).encode())
    retable(scene.engine)  # the sha256 table alone cannot tell: the folder runs unsigned
    code, err, _ = run_cli(capsys, "run", scene.engine, "--max-new-tokens", "1")
    assert code == 0, err
    result = run_cli(capsys, "run", scene.engine, "--trust", signing_keys[1])
    assert_refused(result, scene, "does not match its signature")


def test_trust_refuses_unsigned_and_foreign_engines(scene, capsys, signing_keys, tmp_path):
    from capa_export.signing import generate_keypair

    _, other = generate_keypair(tmp_path / "other")
    assert_refused(run_cli(capsys, "run", scene.engine, "--trust", other), scene, "made with another key")
    (scene.engine / "manifest.sig").unlink()
    assert_refused(run_cli(capsys, "run", scene.engine, "--trust", signing_keys[1]), scene, "is not signed")


def test_build_checks_its_signing_key_before_any_work(tmp_path, capsys):
    (tmp_path / "key.pem").write_text("not a key")
    for key, words in ((tmp_path / "absent.pem", "does not exist"), (tmp_path / "key.pem", "not a usable PEM")):
        code, err, _ = run_cli(capsys, "build", "--sign", key, "--out", tmp_path / "engine")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "engine").exists()


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys, scene):
    from capa_export.signing import sign_folder, verify_folder

    code, err, _ = run_cli(capsys, "keygen", "--out", tmp_path / "keys")
    assert code == 0, err
    private, public = tmp_path / "keys" / "capa-signing-key.pem", tmp_path / "keys" / "capa-signing-key.pub.pem"
    assert private.stat().st_mode & 0o077 == 0
    code, err, _ = run_cli(capsys, "keygen", "--out", tmp_path / "keys")
    assert code == 2 and "never overwritten" in err
    sign_folder(scene.engine, private)
    assert verify_folder(scene.engine, public)["complete"]


def test_validate_checks_its_signing_key_before_any_work(scene, capsys, tmp_path):
    (tmp_path / "key.pem").write_text("not a key")
    before = (scene.engine / "manifest.json").read_bytes()
    assert_refused(run_cli(capsys, "validate", scene.engine, "--sign", tmp_path / "key.pem"), scene, "not a usable PEM")
    assert (scene.engine / "manifest.json").read_bytes() == before


def test_a_stale_signature_is_removed_by_validate(scene, capsys):
    """validate rewrites manifest.json; a signature over other bytes would only say "modified":
    it is removed, and validate says so."""
    from capa_export.signing import signature_is_current

    assert signature_is_current(scene.engine) is True
    manifest = read_manifest(scene.engine)
    manifest["build_seconds"] = 12345.0  # any change to the signed manifest
    write_manifest(scene.engine, manifest)
    assert signature_is_current(scene.engine) is False
    code, err, _ = run_cli(capsys, "validate", scene.engine, "--tokens", "2")
    assert code == 0 and "signature: removed" in err
    assert not (scene.engine / "manifest.sig").exists()


# --- model folders given with --model ------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """tiny-llava saved as a checkpoint folder (weights and config, no processor)."""
    from capa_export.models import load_model

    model, processor = load_model("tiny-llava-random")
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    model.save_pretrained(str(folder))
    return folder, processor


def test_a_checkpoint_without_processor_files_fails_before_its_weights_load(saved_checkpoint, tmp_path, monkeypatch):
    import transformers

    from capa_export.errors import CapaError
    from capa_export.models import load_model

    folder = tmp_path / "tiny"
    shutil.copytree(saved_checkpoint[0], folder)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the processor was checked"))
    with pytest.raises(CapaError, match="has no processor files"):
        load_model(str(folder))


def test_a_checkpoint_config_naming_code_is_refused(saved_checkpoint, tmp_path):
    from capa_export.errors import CapaError
    from capa_export.models import load_model

    folder = tmp_path / "tiny"
    shutil.copytree(saved_checkpoint[0], folder)
    saved_checkpoint[1].save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "planted.PlantedModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "planted.py").write_text(PLANTED_MODULE.format(marker=str(tmp_path / "ran")))
    with pytest.raises(CapaError, match="auto_map names custom code"):
        load_model(str(folder))
    assert not (tmp_path / "ran").exists()
