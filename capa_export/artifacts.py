"""Writing artifacts safely: temporary name first, rename when complete; checksums; JSON."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def check_replaceable(target: str | Path, kind=None, force: bool = False) -> None:
    """Refuse to overwrite anything but an earlier output of the same kind (manifest.ArtifactKind;
    None: any of ours). A complete one is replaced only with force; an engine whose validation did
    not pass (complete: false) is not complete and may be replaced."""
    from .errors import CapaError
    from .manifest import KINDS

    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise CapaError(f"{target} exists and is not a capa-export output folder; choose another --out, or remove it "
                        f"first")
    if not any(target.iterdir()):
        return
    found = [k for k in KINDS.values() if (target / k.file).is_file()]
    if not found:
        raise CapaError(f"{target} exists and is not a capa-export output; choose another --out, or remove it first")
    if kind is None:
        return
    if kind not in found:
        raise CapaError(f"{target} holds {_a(found[0].name)} folder ({found[0].file}), not {_a(kind.name)} folder: "
                        f"choose another --out (only {_a(kind.name)} folder is replaced by this command)")
    if not force and _complete(target, kind):
        raise CapaError(f"{target} holds a complete {kind.name} folder from an earlier run; pass --force to replace it, "
                        f"or choose another --out")


def _a(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _complete(target: Path, kind) -> bool:
    """Only an engine can be incomplete (its validation did not pass); a manifest that cannot be
    read counts as complete: nothing is replaced without --force on a guess."""
    from .errors import CapaError
    from .folders import read_json
    from .manifest import ENGINE

    if kind is not ENGINE:
        return True
    try:
        manifest = read_json(target / kind.file)
    except CapaError:
        return True
    return not (isinstance(manifest, dict) and manifest.get("complete") is False)


@contextlib.contextmanager
def output_lock(target: str | Path):
    """Hold an exclusive lock on `target` (the folder need not exist yet) while a command writes it:
    a second writer is refused in one line instead of both reporting success. The lock is flock on
    a hidden file beside the target, released when the process ends in any way."""
    import fcntl

    from .errors import CapaError

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CapaError(f"{target} is being written by another capa-export process; wait for it to finish, or "
                            f"choose another --out") from None
        try:  # the holder before us removes the file when done: lock the file that is there now
            if os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield target
    finally:
        try:
            os.unlink(lock_path)  # nothing left behind; removed while held, so no one locks a stale file
        except FileNotFoundError:
            pass
        os.close(fd)


def make_work_dir(target: Path) -> Path:
    """A hidden temporary folder next to target (same filesystem: the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be shared (e.g. a serving account)
    return tmp


def replace_directory(target: str | Path, write, kind=None, force: bool = False) -> Path:
    """Call write(tmp_dir), then move tmp_dir to target: a failed run leaves no half-written target.
    An existing target is replaced only if it is an earlier capa-export output (check_replaceable)."""
    target = Path(target)
    check_replaceable(target, kind, force)
    tmp = make_work_dir(target)
    try:
        write(tmp)
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def commit_directory(source: Path, target: Path) -> None:
    """Move a finished work folder to target, replacing what was there (renames only: a reader
    sees the old folder or the new one, never a mix)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        source.rename(target)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, data) -> Path:
    """Strict JSON (NaN/inf written as null) through a new, uniquely named temporary file in the
    same directory, then a rename: readers never see half a file, and a link planted under any
    name is never followed (folders.atomic_write_json)."""
    from .folders import atomic_write_json

    return atomic_write_json(path, data)
