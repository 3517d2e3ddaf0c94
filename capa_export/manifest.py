"""Every artifact folder carries one JSON manifest: what made it, from what, with which settings.

One writer and one reader for every kind; each kind has its own file name and format version:

    engine        manifest.json     an engine folder (`build`): settings, the graph contract, the
                                    sha256 table of every file, the validation summary, `complete`
    calibration   calibration.json  a `calibrate` folder: inputs, CAPA config, FFN errors
    onnx          export.json       an `export` folder: graphs, dtype, weights sharing, checksums
    analysis      report.json       an `analyze` folder: the report itself

An engine is *complete* only when validation passed; the runtime refuses anything else.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .artifacts import sha256_file, write_json
from .errors import CapaError


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    file: str
    format_version: int


ENGINE = ArtifactKind("engine", "manifest.json", 2)
CALIBRATION = ArtifactKind("calibration", "calibration.json", 1)
ONNX = ArtifactKind("onnx", "export.json", 1)
ANALYSIS = ArtifactKind("analysis", "report.json", 1)
KINDS = {k.name: k for k in (ENGINE, CALIBRATION, ONNX, ANALYSIS)}
MANIFEST_FILES = tuple(k.file for k in KINDS.values())

MANIFEST_FILE = ENGINE.file
VALIDATION_FILE = "validation.json"
#: Reports, not engine content: rewritten by `validate`, so outside the checksum table.
UNCHECKED = (MANIFEST_FILE, VALIDATION_FILE)


def tool_block() -> dict:
    return {"name": "capa-export", "version": __version__}


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def header(kind: ArtifactKind) -> dict:
    return {"artifact": kind.name, "format_version": kind.format_version, "tool": tool_block(),
            "libraries": library_versions()}


def write_manifest(directory: Path, kind: ArtifactKind, fields: dict, *, complete: bool | None = None) -> dict:
    """Write `kind`'s manifest into directory. Engines also get `complete` and the checksum table of
    every file in the folder (the manifest and the validation report excepted)."""
    manifest = {**header(kind), **{k: v for k, v in fields.items() if k not in ("artifact", "format_version", "tool")}}
    if kind is ENGINE:
        manifest["complete"] = bool(complete)
        manifest["files"] = file_table(directory)
    write_json(Path(directory) / kind.file, manifest)
    return manifest


def file_table(directory: Path) -> dict:
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _engine_files(directory)}


def _engine_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*"))
            if p.is_file() and not (p.parent == directory and p.name in UNCHECKED) and not p.name.startswith(".")]


def read_json_manifest(directory: Path, kind: ArtifactKind, what: str) -> dict:
    """A manifest of `kind` in directory, as a dict; CapaError naming what is wrong otherwise."""
    path = Path(directory) / kind.file
    if not path.is_file():
        raise CapaError(f"{directory} has no {kind.file}: not {what}, or the command that makes it did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CapaError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CapaError(f"{path} is not a {kind.name} manifest (a JSON object is expected)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > kind.format_version:
        tool = manifest.get("tool")
        made_by = tool.get("version", "?") if isinstance(tool, dict) else "?"
        raise CapaError(f"{path} has format {version} (written by capa-export {made_by}); this capa-export "
                        f"{__version__} reads format {kind.format_version}: upgrade capa-export or make it again")
    if version < kind.format_version:
        raise CapaError(f"{path} has format {version}, written by an older capa-export; this one reads format "
                        f"{kind.format_version}: make it again with this version")
    return manifest


def read_manifest(directory: str | Path, *, verify: bool = True, require_complete: bool = True) -> dict:
    """The manifest of an engine directory, after checking what can be checked; CapaError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CapaError(f"engine directory {directory} does not exist; build one with `capa-export build`")
    manifest = read_json_manifest(directory, ENGINE, "an engine directory")
    path = directory / MANIFEST_FILE
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
