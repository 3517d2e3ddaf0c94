"""Writing artifacts safely: temporary name first, rename when complete; checksums; JSON."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def check_replaceable(target: str | Path) -> None:
    """Refuse to overwrite anything that is not an earlier capa-export output."""
    from .errors import CapaError

    from .manifest import MANIFEST_FILES  # the files that mark a folder as one of our outputs

    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir() or (any(target.iterdir()) and not any((target / m).exists() for m in MANIFEST_FILES)):
        raise CapaError(f"{target} exists and is not a capa-export output; choose another --out, or remove it first")


def make_work_dir(target: Path) -> Path:
    """A hidden temporary folder next to target (same filesystem: the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be shared (e.g. a serving account)
    return tmp


def replace_directory(target: str | Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to target: a failed run leaves no half-written target.
    An existing target is replaced only if it is an earlier capa-export output."""
    target = Path(target)
    check_replaceable(target)
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
