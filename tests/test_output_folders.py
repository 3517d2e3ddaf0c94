"""Folders are never lost: an output folder is replaced only by the same command's kind of
artifact, a complete one only with --force; two writers into one --out: the second is refused;
`validate` writes its report beside the build's."""

import json
import shutil
import threading

import pytest

from capa_export.artifacts import check_replaceable, output_lock
from capa_export.cli import main
from capa_export.errors import CapaError
from capa_export.manifest import ANALYSIS, CALIBRATION, ENGINE, ONNX


def folder_of(tmp_path, kind, **fields):
    folder = tmp_path / kind.name
    folder.mkdir()
    (folder / kind.file).write_text(json.dumps({"artifact": kind.name, **fields}))
    (folder / "content.bin").write_bytes(b"precious")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", [CALIBRATION, ONNX, ANALYSIS, ENGINE])
def test_a_complete_folder_needs_force_and_the_same_kind(tmp_path, kind):
    folder = folder_of(tmp_path, kind, complete=True)
    with pytest.raises(CapaError, match="--force"):
        check_replaceable(folder, kind)
    check_replaceable(folder, kind, force=True)
    for other in {CALIBRATION, ONNX, ANALYSIS, ENGINE} - {kind}:
        with pytest.raises(CapaError, match=f"holds an? {kind.name} folder"):
            check_replaceable(folder, other, force=True)


def test_an_engine_that_failed_validation_may_be_rebuilt(tmp_path):
    check_replaceable(folder_of(tmp_path, ENGINE, complete=False), ENGINE)


def test_a_folder_not_ours_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(CapaError, match="not a capa-export output"):
        check_replaceable(tmp_path / "mine", ENGINE, force=True)


@pytest.mark.parametrize("argv, kind", [
    (["build", "--out"], CALIBRATION),       # build --out X replaced a calibrate folder with an engine
    (["calibrate", "--calibration-count", "1", "--out"], ENGINE),  # calibrate --out ENGINE wiped an engine
    (["export", "--out"], ENGINE),
    (["analyze", "--calibration-count", "1", "--out"], CALIBRATION),
])
def test_commands_refuse_another_kind_in_one_line(tmp_path, capsys, argv, kind):
    folder = folder_of(tmp_path, kind, complete=True)
    code, _, err = run(capsys, *argv, folder, "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"holds a{'n' if kind.name[0] in 'aeiou' else ''} " \
        f"{kind.name} folder" in err
    assert (folder / "content.bin").read_bytes() == b"precious"


def test_calibrate_twice_needs_force(tmp_path, capsys):
    out = tmp_path / "c"
    assert run(capsys, "calibrate", "--calibration-count", "1", "--out", out)[0] == 0
    code, _, err = run(capsys, "calibrate", "--calibration-count", "1", "--out", out)
    assert code == 2 and "--force" in err
    assert run(capsys, "calibrate", "--calibration-count", "1", "--out", out, "--force")[0] == 0


def test_a_second_build_into_the_same_folder_is_refused(tmp_path, capsys):
    target = tmp_path / "engine"
    with output_lock(target):
        code, _, err = run(capsys, "build", "--out", target)
    assert code == 2 and "being written by another capa-export process" in err and not target.exists()


def test_the_lock_is_exclusive_across_threads_of_writers(tmp_path):
    target, outcomes = tmp_path / "engine", []
    entered, release = threading.Event(), threading.Event()

    def first():
        with output_lock(target):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    try:
        with output_lock(target):
            outcomes.append("both")
    except CapaError:
        outcomes.append("refused")
    release.set()
    thread.join()
    assert outcomes == ["refused"]
    with output_lock(target):  # released with its holder
        pass


def test_validate_writes_its_report_beside_the_builds(cpu_engine, tmp_path, capsys):
    engine = tmp_path / "engine"
    shutil.copytree(cpu_engine[0], engine)
    built = (engine / "validation.json").read_bytes()
    code, out, _ = run(capsys, "validate", engine, "--tokens", "2")
    assert code == 0 and "validation PASSED" in out
    assert (engine / "validation.json").read_bytes() == built
    assert json.loads((engine / "revalidation.json").read_text())["max_new_tokens"] == 2
    code, _, err = run(capsys, "run", engine, "--max-new-tokens", "2")  # every file still accounted for
    assert code == 0, err
