"""The engine manifest (`manifest.json`): what built an engine directory, from what, with which
settings, every file's checksum, and the validation result. An engine is *complete* only when
validation passed; the runtime refuses anything else."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .artifacts import sha256_file, write_json
from .errors import CapaError

MANIFEST_FILE = "manifest.json"
VALIDATION_FILE = "validation.json"
#: Reports, not engine content: rewritten by `validate`, so outside the checksum table.
UNCHECKED = (MANIFEST_FILE, VALIDATION_FILE)
FORMAT_VERSION = 1


def file_table(directory: Path) -> dict:
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _engine_files(directory)}


def _engine_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*"))
            if p.is_file() and not (p.parent == directory and p.name in UNCHECKED) and not p.name.startswith(".")]


def write_manifest(directory: Path, fields: dict, complete: bool) -> dict:
    manifest = {"format_version": FORMAT_VERSION, "tool": {"name": "capa-export", "version": __version__},
                **fields, "complete": complete, "files": file_table(directory)}
    write_json(directory / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(directory: str | Path, *, verify: bool = True, require_complete: bool = True) -> dict:
    """The manifest of an engine directory, after checking what can be checked; CapaError otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CapaError(f"engine directory {directory} does not exist; build one with `capa-export build`")
    if not path.is_file():
        raise CapaError(f"{directory} has no {MANIFEST_FILE}: not an engine directory, or its build did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CapaError(f"{path} is not valid JSON ({exc}); rebuild the engine") from None
    if not isinstance(manifest, dict):
        raise CapaError(f"{path} is not an engine manifest (a JSON object is expected); rebuild the engine")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        tool = manifest.get("tool")
        made_by = tool.get("version", "?") if isinstance(tool, dict) else "?"
        raise CapaError(f"{path} has manifest format {version} (written by capa-export {made_by}); this capa-export "
                        f"{__version__} reads format {FORMAT_VERSION}: upgrade capa-export or rebuild the engine")
    if require_complete and not manifest.get("complete"):
        raise CapaError(f"engine {directory} is not complete (validation did not pass: see validation.json); "
                        f"rebuild it, or validate it with `capa-export validate`")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CapaError(f"{path} lists no files with checksums; rebuild the engine")
    unlisted = sorted(str(p.relative_to(directory)) for p in _engine_files(directory)
                      if str(p.relative_to(directory)) not in files)
    if unlisted:
        raise CapaError(f"engine {directory} holds files its manifest does not list ({', '.join(unlisted[:3])}); "
                        f"remove them or rebuild the engine")
    if verify:
        for name, entry in files.items():
            file = directory / name
            if not file.is_file():
                raise CapaError(f"engine file {file} is missing; rebuild the engine")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise CapaError(f"engine file {file} does not match its checksum in {MANIFEST_FILE} (corrupted or "
                                f"modified); rebuild the engine")
    return manifest
