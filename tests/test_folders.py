"""capa_export.folders: engine folders as untrusted input.

Each test plants what a hostile folder could hold (links, '..' paths, huge or deep JSON, code,
decompression bombs) and checks the one-line refusal, and that nothing outside was touched or
run. References are independent: hashlib over bytes the test wrote, names the test created,
ONNX Runtime loading the same graph, the in-memory processor the folder was saved from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from capa_export import folders, schemas
from capa_export.errors import CapaError
from capa_export.manifest import UNCHECKED


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- atomic writes -----------------------------------------------------------------------------
def test_write_never_follows_a_link_at_the_old_fixed_temporary_name(tmp_path):
    """The review's attack: a link planted at `.<name>.tmp` made validate write outside the folder."""
    folder, outside = tmp_path / "engine", tmp_path / "outside.txt"
    folder.mkdir()
    outside.write_text("precious")
    planted = [".manifest.json.tmp", ".manifest.json.tmp.0", ".manifest.json.1.tmp", ".manifest.json.a.tmp"]
    for name in planted:
        (folder / name).symlink_to(outside)
    folders.atomic_write_json(folder / "manifest.json", {"complete": True})
    assert outside.read_text() == "precious"
    assert json.loads((folder / "manifest.json").read_text()) == {"complete": True}
    assert all((folder / name).is_symlink() for name in planted)


def test_write_skips_a_link_planted_at_the_exact_random_name(tmp_path, monkeypatch):
    """mkstemp's names are random; make them predictable to plant a link at the first one."""
    if not hasattr(tempfile, "_get_candidate_names"):
        pytest.skip("this Python's tempfile has no _get_candidate_names to make names predictable")
    folder, outside = tmp_path / "engine", tmp_path / "outside.txt"
    folder.mkdir()
    outside.write_text("precious")
    (folder / ".validation.json.guessed.tmp").symlink_to(outside)
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["guessed", "guessed", "other"]))
    folders.atomic_write_json(folder / "validation.json", {"passed": False})
    assert outside.read_text() == "precious"
    assert json.loads((folder / "validation.json").read_text()) == {"passed": False}


def test_write_replaces_a_link_at_the_target_instead_of_following_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "manifest.json").symlink_to(outside)
    folders.atomic_write_bytes(tmp_path / "manifest.json", b"new")
    assert outside.read_text() == "precious"
    assert not (tmp_path / "manifest.json").is_symlink() and (tmp_path / "manifest.json").read_bytes() == b"new"


def test_write_json_is_strict_and_readable_by_others(tmp_path):
    path = folders.atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": Path("x")})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": "x"}
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left


def test_failed_write_is_one_line_and_leaves_no_temporary(tmp_path):
    (tmp_path / "manifest.json").mkdir()  # the target is a directory: the rename fails
    with pytest.raises(CapaError) as exc:
        folders.atomic_write_json(tmp_path / "manifest.json", {})
    assert "manifest.json" in one_line(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """A fixed temporary name made two writers rename each other's file (FileNotFoundError) or
    interleave their bytes."""
    target, errors = tmp_path / "validation.json", []
    documents = [{"writer": w, "payload": "x" * (4096 * (w + 1))} for w in range(4)]

    def write(document):
        try:
            for _ in range(30):
                folders.atomic_write_json(target, document)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(d,)) for d in documents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text()) in documents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validation.json"]


# --- folder lock -------------------------------------------------------------------------------
def test_a_second_writer_is_refused_or_waits(tmp_path):
    with folders.folder_lock(tmp_path):
        with pytest.raises(CapaError) as exc:
            with folders.folder_lock(tmp_path, blocking=False):
                pass
        assert str(tmp_path) in one_line(exc) and "another capa-export process" in str(exc.value)
        acquired = threading.Event()

        def wait_for_lock():
            with folders.folder_lock(tmp_path):
                acquired.set()

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        waiter.join(0.3)
        assert not acquired.is_set()  # still waiting while the first holder writes
    waiter.join()
    assert acquired.is_set()


def test_the_lock_holds_across_processes(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from capa_export.folders import folder_lock\n"
                               f"with folder_lock({str(tmp_path)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(CapaError):
            with folders.folder_lock(tmp_path, blocking=False):
                pass
    finally:
        child.communicate("")
    with folders.folder_lock(tmp_path, blocking=False):  # released when the holder exits
        pass


# --- confinement -------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", ["", "/etc/passwd", "../outside.txt", "onnx/../../outside.txt", "onnx//a.onnx",
                                      "./a.onnx", ".hidden", "onnx/.git/config", "a\x00b", "a\nb", "onnx/", 7, None])
def test_confined_file_refuses_paths_leaving_the_folder(tmp_path, relative):
    (tmp_path / "engine" / "onnx").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("secret")
    with pytest.raises(CapaError) as exc:
        folders.confined_file(tmp_path / "engine", relative, source="manifest.json: files")
    assert one_line(exc).startswith("manifest.json: files")


def test_confined_file_refuses_links_special_files_and_directories(tmp_path):
    root = tmp_path / "engine"
    (root / "onnx").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.onnx").write_bytes(b"x")
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a directory link in the middle
    (root / "onnx" / "link.onnx").symlink_to(tmp_path / "elsewhere" / "a.onnx")  # a file link at the end
    os.mkfifo(root / "onnx" / "pipe.onnx")
    (root / "onnx" / "real.onnx").write_bytes(b"graph")
    for relative, reason in [("linked/a.onnx", "symbolic link"), ("onnx/link.onnx", "symbolic link"),
                             ("onnx/pipe.onnx", "special file"), ("onnx", "a directory"),
                             ("onnx/real.onnx/x", "not a directory"), ("onnx/missing.onnx", "does not exist")]:
        with pytest.raises(CapaError) as exc:
            folders.confined_file(root, relative)
        assert reason in one_line(exc), relative
    assert folders.confined_file(root, "onnx/real.onnx") == root / "onnx" / "real.onnx"
    assert folders.confined_directory(root, "onnx") == root / "onnx"
    with pytest.raises(CapaError, match="symbolic link"):
        folders.confined_directory(root, "linked")


def test_confinement_is_no_file_existence_oracle(tmp_path):
    """A name outside the folder is refused by its shape, the same whether the file exists or not."""
    root = tmp_path / "engine"
    root.mkdir()
    (tmp_path / "exists.txt").write_text("x")
    messages = []
    for name in ("../exists.txt", "../absent.txt"):
        with pytest.raises(CapaError) as exc:
            folders.confined_file(root, name)
        messages.append(str(exc.value).replace(name, "NAME"))
    assert messages[0] == messages[1]


# --- scanning ----------------------------------------------------------------------------------
def test_scan_lists_every_file_and_refuses_what_rglob_skipped(tmp_path):
    root = tmp_path / "engine"
    created = ["manifest.json", "onnx/a.onnx", "onnx/weights.data", "processor/tokenizer.json", "x/y/z/deep.bin"]
    for name in created:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    assert folders.scan_folder(root) == sorted(created)
    (tmp_path / "elsewhere").mkdir()
    cases = [("linked_dir", lambda p: p.symlink_to(tmp_path / "elsewhere"), "symbolic link"),
             ("onnx/linked.onnx", lambda p: p.symlink_to(root / "onnx" / "a.onnx"), "symbolic link"),
             ("onnx/.manifest.json.tmp", lambda p: p.write_text("{}"), "hidden"),
             ("onnx/pipe", lambda p: os.mkfifo(p), "special file")]
    for name, plant, reason in cases:
        plant(root / name)
        with pytest.raises(CapaError) as exc:
            folders.scan_folder(root)
        assert reason in one_line(exc) and name in str(exc.value)
        (root / name).unlink()
    assert folders.scan_folder(root) == sorted(created)


def test_scan_caps_the_number_of_entries(tmp_path):
    root = tmp_path / "engine"
    deep = root.joinpath(*["d"] * 400)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"")
    assert folders.scan_folder(root) == ["/".join(["d"] * 400 + ["f"])]
    with pytest.raises(CapaError) as exc:
        folders.scan_folder(root, max_entries=100)
    assert "more than 100 entries" in one_line(exc)


# --- reading JSON ------------------------------------------------------------------------------
def test_read_json_refuses_links_fifos_and_huge_files_before_reading(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"format_version": 1}')
    (tmp_path / "linked.json").symlink_to(outside)
    with pytest.raises(CapaError, match="symbolic link"):
        folders.read_json(tmp_path / "linked.json")
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(CapaError, match="special file"):  # opening it would block
        folders.read_json(tmp_path / "pipe.json")
    huge = tmp_path / "manifest.json"
    with open(huge, "wb") as handle:
        handle.truncate(500 << 20)  # sparse: 500 MB claimed, nothing allocated
    with pytest.raises(CapaError) as exc:
        folders.read_json(huge)
    assert f"is {500 << 20} bytes" in one_line(exc)


@pytest.mark.parametrize("text, words", [
    (b"[" * 200_000 + b"]" * 200_000, "nests deeper than 64"),  # RecursionError in json without the cap
    (b"[" * 65 + b"]" * 65, "nests deeper than 64"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b'{"complete": false, "complete": true}', "appears twice"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": 1', "line 1 column 8"),
    (b"1" * 5000, "not valid JSON"),
])
def test_parse_json_refusals_are_one_line(text, words):
    with pytest.raises(CapaError) as exc:
        folders.parse_json(text, "manifest.json")
    assert words in one_line(exc) and one_line(exc).startswith("manifest.json")


def test_parse_json_depth_limit_is_exact():
    assert folders.parse_json(b"[" * 64 + b"]" * 64, "x.json") == json.loads("[" * 64 + "]" * 64)
    with pytest.raises(CapaError):
        folders.parse_json(b"[" * 3 + b"]" * 3, "x.json", max_depth=2)


def minimal_manifest(files: dict) -> dict:
    """The fields build.build_engine writes, with a file table computed by the test."""
    return {"format_version": 1, "tool": {"name": "capa-export", "version": "0.1.0"},
            "model": {"name": "tiny-llava-random", "family": "llava", "image_token_id": 32000, "vocab_size": 32064,
                      "hidden_size": 128, "num_layers": 8, "num_kv_heads": 2, "head_dim": 32,
                      "image_size": 336, "visual_tokens_per_image": 576},
            "capa_config": {"prune": [[2, 64]], "variant": "contrib", "queries": "text", "ffn_layers": [1, 2]},
            "profile": {"name": "cpu", "shapes": {"batch": [1, 1, 4], "sequence": [8, 640, 2048], "past": [1, 700, 4096]}},
            "backend": "onnxruntime", "backend_dir": "onnxruntime", "dtype": "fp32", "pruning": "function", "k": 64,
            "layer_segment": [0, 0, 1, 1], "libraries": {"onnx": "1.23"}, "complete": True,
            "files": {name: {"bytes": len(data), "sha256": sha256(data)} for name, data in files.items()}}


def broken(change):
    manifest = minimal_manifest({"onnx/vision.onnx": b"graph"})
    change(manifest)
    return manifest


@pytest.mark.parametrize("manifest, message", [
    (broken(lambda m: m["files"]["onnx/vision.onnx"].update(sha256="abc")),
     'manifest.json: files["onnx/vision.onnx"].sha256 must be a 64-hex string'),
    (broken(lambda m: m["files"]["onnx/vision.onnx"].update(bytes="5")), 'files["onnx/vision.onnx"].bytes must be'),
    (broken(lambda m: m["files"].update({"../outside": {"bytes": 1, "sha256": "0" * 64}})), "files has a key '../outside'"),
    (broken(lambda m: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}})), "files has a key '/etc/passwd'"),
    (broken(lambda m: m.pop("files")), "key files is missing"),
    (broken(lambda m: m.update(files=[])), "files must be an object"),
    (broken(lambda m: m.update(format_version="1")), "format_version must be an integer"),
    (broken(lambda m: m["model"].pop("family")), "key model.family is missing"),
    (broken(lambda m: m.update(backend_dir="../../tmp")), "backend_dir must be a directory name inside the folder"),
    (broken(lambda m: m.update(backend="pickle")), 'backend must be one of "onnxruntime", "tensorrt"'),
    (broken(lambda m: m["capa_config"].update(prune=[[2, "64"]])), "capa_config.prune[0][1] must be"),
    (broken(lambda m: m["profile"]["shapes"].update(past=[1, 2])), "profile.shapes.past must be [min, opt, max]"),
    (broken(lambda m: m.update(complete="yes")), "complete must be true or false"),
])
def test_manifest_schema_names_the_key_and_what_is_right(manifest, message):
    folders.check_schema(minimal_manifest({"onnx/vision.onnx": b"graph"}), schemas.ENGINE_MANIFEST, "manifest.json")
    with pytest.raises(CapaError) as exc:
        folders.check_schema(manifest, schemas.ENGINE_MANIFEST, "manifest.json")
    assert message in one_line(exc)


def test_session_schema_refuses_graph_paths_out_of_the_folder_and_provider_options():
    good = {"backend": "onnxruntime", "providers": [["CUDAExecutionProvider", {"gpu_mem_limit": "1024"}],
                                                     "CPUExecutionProvider"],
            "graphs": {g: f"{g}.opt.onnx" for g in schemas.GRAPH_NAMES}}
    folders.check_schema(good, schemas.ORT_SESSION, "session.json")
    bad_graph = {**good, "graphs": {**good["graphs"], "prefill": "../../elsewhere.onnx"}}
    with pytest.raises(CapaError, match=r"graphs.prefill must be a plain file name"):
        folders.check_schema(bad_graph, schemas.ORT_SESSION, "session.json")
    # TensorRT's execution provider loads the libraries this option names
    plugin = {**good, "providers": [["TensorrtExecutionProvider", {"trt_extra_plugin_lib_paths": "/tmp/x.so"}]]}
    with pytest.raises(CapaError, match=r"providers\[0\] must be a provider name"):
        folders.check_schema(plugin, schemas.ORT_SESSION, "session.json")
    # the plugin is named, never loaded from a path the folder gives
    trt = {"backend": "tensorrt", "graphs": {g: f"{g}.plan" for g in schemas.GRAPH_NAMES},
           "plugin": "/usr/lib/evil.so", "embedded_plugins": False}
    with pytest.raises(CapaError, match="plugin must be null or the plugin's"):
        folders.check_schema(trt, schemas.TENSORRT_ENGINE, "tensorrt.json")


# --- the file table ----------------------------------------------------------------------------
def make_folder(root: Path, files: dict[str, bytes]) -> dict:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    manifest = minimal_manifest(files)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


ENGINE_FILES = {"onnx/vision.onnx": b"vision graph", "onnxruntime/session.json": b"{}", "processor/tokenizer.json": b"{}"}


def test_file_table_accepts_the_folder_it_describes_and_nothing_else(tmp_path):
    root = tmp_path / "engine"
    manifest = make_folder(root, ENGINE_FILES)
    folders.verify_file_table(root, manifest["files"])
    (root / "onnx" / "vision.onnx").write_bytes(b"vision grapH")  # same size, one byte changed
    with pytest.raises(CapaError, match="does not match its sha256"):
        folders.verify_file_table(root, manifest["files"])
    (root / "onnx" / "vision.onnx").write_bytes(b"vision graph!")
    with pytest.raises(CapaError, match="is 13 bytes but manifest.json lists 12"):
        folders.verify_file_table(root, manifest["files"])
    (root / "onnx" / "vision.onnx").write_bytes(ENGINE_FILES["onnx/vision.onnx"])
    (root / "onnx" / "extra.py").write_text("print('hi')")
    with pytest.raises(CapaError, match="does not list .*extra.py"):
        folders.verify_file_table(root, manifest["files"])
    (root / "onnx" / "extra.py").unlink()
    (root / "processor" / "tokenizer.json").unlink()
    with pytest.raises(CapaError, match="tokenizer.json.*is missing"):
        folders.verify_file_table(root, manifest["files"])


def test_file_table_never_hashes_a_path_outside(tmp_path, monkeypatch):
    root = tmp_path / "engine"
    manifest = make_folder(root, ENGINE_FILES)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    files = {**manifest["files"], "../secret.txt": {"bytes": 6, "sha256": sha256(b"secret")}}
    with pytest.raises(CapaError, match="contains '..'"):
        folders.verify_file_table(root, files)
    assert not any("secret" in p for p in opened)


def test_file_table_refuses_a_linked_directory_rglob_skipped(tmp_path):
    root = tmp_path / "engine"
    manifest = make_folder(root, ENGINE_FILES)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "payload.so").write_bytes(b"\x7fELF")
    (root / "plugins").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CapaError, match="plugins.*symbolic link"):
        folders.verify_file_table(root, manifest["files"])


# --- verified bytes and native code ------------------------------------------------------------
def test_read_verified_bytes_returns_the_bytes_it_hashed(tmp_path):
    path = tmp_path / "vision.plan"
    path.write_bytes(b"plan bytes")
    assert folders.read_verified_bytes(path, sha256(b"plan bytes"), expected_bytes=10) == b"plan bytes"
    with pytest.raises(CapaError, match="does not match its sha256"):
        folders.read_verified_bytes(path, sha256(b"other bytes"))
    with pytest.raises(CapaError, match="is 10 bytes but its manifest lists 11"):
        folders.read_verified_bytes(path, sha256(b"plan bytes"), expected_bytes=11)


def compile_library(directory: Path, name: str, value: int) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (gcc/cc) to build a test library")
    source = directory / f"{name}.c"
    source.write_text(f"int capa_probe(void) {{ return {value}; }}\n")
    library = directory / f"lib{name}.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def test_load_library_verified_loads_the_checked_bytes(tmp_path):
    library = compile_library(tmp_path, "plain", 4242)
    loaded = folders.load_library_verified(library, sha256(library.read_bytes()))
    assert loaded.handle.capa_probe() == 4242
    assert not loaded.path.startswith(str(tmp_path))  # never loaded from the folder's path
    with pytest.raises(CapaError, match="does not match its sha256"):
        folders.load_library_verified(library, sha256(b"something else"))


def test_load_library_falls_back_to_a_private_copy_where_memfd_is_not_executable(tmp_path, monkeypatch):
    library = compile_library(tmp_path, "fallback", 3003)

    def no_exec_memfd(*args):
        raise OSError("failed to map segment from shared object")  # what vm.memfd_noexec=2 gives

    monkeypatch.setattr(folders, "_load_from_memfd", no_exec_memfd)
    loaded = folders.load_library_verified(library, sha256(library.read_bytes()))
    assert loaded.handle.capa_probe() == 3003
    assert not loaded.path.startswith(str(tmp_path)) and not os.path.exists(loaded.path)  # the copy is gone


def test_load_library_has_no_gap_between_check_and_use(tmp_path, monkeypatch):
    """The file is swapped for another library right after its bytes are read (while they are
    hashed): hashing then reopening the path would load the swapped one."""
    good = compile_library(tmp_path, "good", 1001)
    evil = compile_library(tmp_path, "evil", 1002)
    target = tmp_path / "engine" / "libcapa_contrib_topk_plugin.so"
    target.parent.mkdir()
    shutil.copy(good, target)
    expected = sha256(good.read_bytes())
    real_sha256 = hashlib.sha256

    def swap_then_hash(*args, **kwargs):
        if target.read_bytes() != evil.read_bytes():
            replacement = target.with_name("incoming.so")
            shutil.copy(evil, replacement)
            os.replace(replacement, target)
        return real_sha256(*args, **kwargs)

    monkeypatch.setattr(folders.hashlib, "sha256", swap_then_hash)
    loaded = folders.load_library_verified(target, expected)
    monkeypatch.undo()
    assert target.read_bytes() == evil.read_bytes()  # the swap happened
    assert loaded.handle.capa_probe() == 1001


# --- ONNX external data ------------------------------------------------------------------------
def external_data_graph(directory: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "g.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.data", size_threshold=0)
    return path


def set_location(path: Path, location: str | None = None, length: int | None = None) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key == "length" and length is not None:
            entry.value = str(length)
    onnx.save_model(model, str(path))


def test_external_data_check_accepts_what_onnx_runtime_loads(tmp_path):
    import onnxruntime as ort

    root = tmp_path / "engine"
    path = external_data_graph(root / "onnx")
    assert folders.check_external_data(root, "onnx/g.onnx") == ["onnx/weights.data"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x @ np.arange(6, dtype=np.float32).reshape(2, 3))


def test_external_data_outside_missing_or_out_of_bounds_is_one_line(tmp_path):
    root = tmp_path / "engine"
    path = external_data_graph(root / "onnx")
    (tmp_path / "outside.data").write_bytes(bytes(24))
    cases = [("../../outside.data", None, "contains '..'"), (str(tmp_path / "outside.data"), None, "is absolute"),
             ("absent.data", None, "does not exist"), ("weights.data", 4096, "lie outside")]
    for location, length, words in cases:
        set_location(path, location, length)
        with pytest.raises(CapaError) as exc:
            folders.check_external_data(root, "onnx/g.onnx")
        assert words in one_line(exc) and "weight" in str(exc.value)
        set_location(path, "weights.data", 24)
    folders.check_external_data(root, "onnx/g.onnx")
    (root / "onnx" / "g.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(CapaError, match="not a readable ONNX graph"):
        folders.check_external_data(root, "onnx/g.onnx")


# --- processors --------------------------------------------------------------------------------
@pytest.fixture
def saved_processor(tmp_path):
    from capa_export.models.tiny import tiny_llava_processor

    directory = tmp_path / "processor"
    tiny_llava_processor().save_pretrained(str(directory))
    return directory


MARKER_CODE = textwrap.dedent("""
    from pathlib import Path
    Path({marker!r}).write_text("planted code ran")
    from transformers import LlavaProcessor
    class PlantedProcessor(LlavaProcessor):
        pass
""")


def plant_code(directory: Path, marker: Path, config: str = "processor_config.json", nested: bool = False) -> None:
    (directory / "planted_processing.py").write_text(MARKER_CODE.format(marker=str(marker)))
    data = json.loads((directory / config).read_text())
    auto_map = {"AutoProcessor": "planted_processing.PlantedProcessor"}
    if nested:
        data["extra"] = [{"auto_map": auto_map}]
    else:
        data["auto_map"] = auto_map
    (directory / config).write_text(json.dumps(data))


def test_local_processor_loads_what_was_saved(saved_processor):
    from capa_export.models.tiny import tiny_llava_processor

    loaded = folders.load_local_processor(saved_processor)
    reference = tiny_llava_processor()
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert loaded.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]
    assert loaded.image_processor.crop_size == reference.image_processor.crop_size


def test_planted_code_is_refused_and_never_runs(saved_processor, tmp_path):
    marker = tmp_path / "marker.txt"
    plant_code(saved_processor, marker)
    with pytest.raises(CapaError) as exc:
        folders.load_local_processor(saved_processor)
    assert "planted_processing.py" in one_line(exc)
    assert not marker.exists()
    # without the .py file, the auto_map alone is refused too
    (saved_processor / "planted_processing.py").unlink()
    with pytest.raises(CapaError, match=r"processor_config.json: auto_map names custom code"):
        folders.load_local_processor(saved_processor)
    assert not marker.exists()


def test_auto_map_is_found_at_any_depth_of_any_config(saved_processor, tmp_path):
    marker = tmp_path / "marker.txt"
    plant_code(saved_processor, marker, config="tokenizer_config.json", nested=True)
    (saved_processor / "planted_processing.py").unlink()
    with pytest.raises(CapaError, match=r"tokenizer_config.json: extra\[0\].auto_map names custom code"):
        folders.load_local_processor(saved_processor)


def test_the_marker_would_be_written_if_the_code_ran(saved_processor, tmp_path):
    """Positive control: transformers with trust_remote_code=True does run the planted file, so the
    marker's absence above means the code did not run."""
    marker = tmp_path / "marker.txt"
    plant_code(saved_processor, marker)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules"),
           "HF_HUB_OFFLINE": "1"}
    script = ("from transformers import AutoProcessor\n"
              f"AutoProcessor.from_pretrained({str(saved_processor)!r}, trust_remote_code=True, local_files_only=True)")
    subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert marker.read_text() == "planted code ran"


def test_sandboxed_chat_template_and_missing_files_are_one_line(saved_processor):
    (saved_processor / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(CapaError) as exc:
        folders.load_local_processor(saved_processor)
    assert "SecurityError" in one_line(exc)
    (saved_processor / "chat_template.jinja").write_text("{% for message in %}")
    with pytest.raises(CapaError, match="TemplateSyntaxError"):
        folders.load_local_processor(saved_processor)
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        (saved_processor / name).unlink()
    with pytest.raises(CapaError) as exc:
        folders.load_local_processor(saved_processor)
    assert "cannot be loaded" in one_line(exc)


def test_render_chat_template_wraps_template_errors(saved_processor):
    processor = folders.load_local_processor(saved_processor)
    processor.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(CapaError) as exc:
        folders.render_chat_template(processor, [{"role": "user", "content": "hi"}])
    assert "roles must alternate" in one_line(exc)


# --- images ------------------------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with one tiny (truncated) data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(20_000, 20_000), (12_000, 12_000), (9_000, 9_000)])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, width, height):
    """400 MP (PIL's error), 144 MP (PIL's warning: it would decode 430 MB), 81 MP (below PIL's
    limit, above ours): refused before any pixel is decoded."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(width, height))
    with pytest.raises(CapaError) as exc:
        folders.open_image(path)
    assert "pixels" in one_line(exc) and f"at most {folders.MAX_IMAGE_PIXELS}" in str(exc.value)


def test_open_image_reads_real_images_and_honours_max_pixels(tmp_path):
    from PIL import Image

    pixels = (np.random.RandomState(0).rand(30, 40, 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "small.png")
    np.testing.assert_array_equal(np.asarray(folders.open_image(tmp_path / "small.png")), pixels)
    with pytest.raises(CapaError, match="40 x 30 = 1200 pixels; at most 1000"):
        folders.open_image(tmp_path / "small.png", max_pixels=1000)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CapaError, match="cannot be read as an image"):
        folders.open_image(tmp_path / "broken.png")
    Image.fromarray(pixels).save(tmp_path / "small.tiff")  # readable by PIL, not among the default formats
    with pytest.raises(CapaError, match="PNG, JPEG"):
        folders.open_image(tmp_path / "small.tiff")
    np.testing.assert_array_equal(np.asarray(folders.open_image(tmp_path / "small.tiff", formats=["TIFF"])), pixels)


# --- what the build writes ---------------------------------------------------------------------
def test_schemas_and_checks_accept_a_built_engine(cpu_engine):
    """The schemas describe what build writes: a real engine folder passes every check."""
    engine, _ = cpu_engine
    manifest = folders.read_json(engine / "manifest.json", schema=schemas.ENGINE_MANIFEST)
    backend_dir = folders.confined_directory(engine, manifest["backend_dir"], source="manifest.json: backend_dir")
    session = folders.read_json(backend_dir / "session.json", schema=schemas.ORT_SESSION)
    folders.read_json(engine / "calibration" / "capa_config.json", schema=schemas.CAPA_CONFIG)
    folders.read_json(engine / "calibration" / "ffn_approx.json", schema=schemas.FFN_APPROXIMATION)
    folders.verify_file_table(engine, manifest["files"])
    # besides the listed files, only those the table cannot list (a later `validate` writes
    # revalidation.json into the shared engine)
    assert set(manifest["files"]) <= set(folders.scan_folder(engine)) <= set(manifest["files"]) | set(UNCHECKED)
    for graph in session["graphs"].values():
        folders.confined_file(backend_dir, graph, source="session.json: graphs")
        assert folders.check_external_data(engine, f"{manifest['backend_dir']}/{graph}")
    folders.load_local_processor(engine / "processor")
