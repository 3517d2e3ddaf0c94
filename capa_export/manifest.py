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

import platform
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .artifacts import sha256_file, write_json
from .errors import CapaError
from .folders import MAX_JSON_BYTES, check_schema, parse_json, read_bytes, scan_folder, verify_file_table
from .schemas import CALIBRATION_MANIFEST, ENGINE_MANIFEST


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
#: `validate`'s report, written beside the build's validation.json (which it never replaces)
REVALIDATION_FILE = "revalidation.json"
#: The detached Ed25519 signature of manifest.json (capa_export.signing).
SIGNATURE_FILE = "manifest.sig"
#: Reports and the signature, not engine content: rewritten by `validate`, so outside the checksum
#: table (the signature covers the manifest, which covers the table).
UNCHECKED = (MANIFEST_FILE, VALIDATION_FILE, REVALIDATION_FILE, SIGNATURE_FILE)
#: The schema each kind's manifest is checked against when read back (None: not read from
#: folders received from others).
SCHEMAS = {"engine": ENGINE_MANIFEST, "calibration": CALIBRATION_MANIFEST}


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
    """{relative name: {bytes, sha256}} of every file in an engine folder but UNCHECKED; links,
    special files and hidden entries are refused (scan_folder), never skipped."""
    directory = Path(directory)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
            for name in scan_folder(directory) if name not in UNCHECKED}


def parse_manifest(data: bytes, path: Path, kind: ArtifactKind) -> dict:
    """A manifest of `kind` from its bytes: strict bounded JSON, the format version checked first
    (so a newer tool's manifest says "upgrade" rather than failing its schema), then its schema."""
    manifest = parse_json(data, str(path))
    if not isinstance(manifest, dict):
        raise CapaError(f"{path} is not a {kind.name} manifest (a JSON object is expected)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > kind.format_version:
        tool = manifest.get("tool")
        made_by = tool.get("version", "?") if isinstance(tool, dict) else "?"
        raise CapaError(f"{path} has format {str(version)[:20]} (written by capa-export {str(made_by)[:20]}); this "
                        f"capa-export {__version__} reads format {kind.format_version}: upgrade capa-export or make "
                        f"it again")
    if version < kind.format_version:
        raise CapaError(f"{path} has format {version}, written by an older capa-export; this one reads format "
                        f"{kind.format_version}: make it again with this version")
    schema = SCHEMAS.get(kind.name)
    if schema is not None:
        check_schema(manifest, schema, str(path))
    return manifest


def read_json_manifest(directory: Path, kind: ArtifactKind, what: str) -> dict:
    """A manifest of `kind` in directory, as a dict; CapaError naming what is wrong otherwise."""
    import os

    path = Path(directory) / kind.file
    if not os.path.lexists(path):
        raise CapaError(f"{directory} has no {kind.file}: not {what}, or the command that makes it did not finish")
    return parse_manifest(read_bytes(path, max_bytes=MAX_JSON_BYTES, name=str(path)), path, kind)


def check_engine_manifest(manifest: dict, directory: Path, *, require_complete: bool = True) -> dict:
    """What the schema cannot say about an engine manifest: complete, and backend_dir the
    backend's own folder (never another folder of the engine, never one outside)."""
    if require_complete and not manifest["complete"]:
        raise CapaError(f"engine {directory} is not complete (validation did not pass: see validation.json); "
                        f"rebuild it, or validate it with `capa-export validate`")
    if manifest["backend_dir"] != manifest["backend"]:
        raise CapaError(f"{directory}/{MANIFEST_FILE}: backend_dir must be {manifest['backend']!r}, the "
                        f"{manifest['backend']} backend's own folder (got {manifest['backend_dir'][:60]!r})")
    return manifest


def read_manifest(directory: str | Path, *, verify: bool = True, require_complete: bool = True,
                  trust=None) -> dict:
    """The manifest of an engine directory, after checking what can be checked; CapaError otherwise.

    Always: bounded strict JSON, the format version, the schema, backend_dir, and the folder holding
    exactly the files the table lists (no link, special file or hidden entry anywhere), with their
    sizes. verify: also every file's sha256. trust (a PEM public key, bytes or path): the manifest's
    Ed25519 signature (manifest.sig) must verify with it, and every sha256 is checked, whatever
    verify says: the manifest used is parsed from the very bytes whose signature verified."""
    from .signing import signed_manifest_bytes

    directory = Path(directory)
    if not directory.is_dir():
        raise CapaError(f"engine directory {directory} does not exist; build one with `capa-export build`")
    path = directory / MANIFEST_FILE
    if trust is not None:
        manifest = parse_manifest(signed_manifest_bytes(directory, trust), path, ENGINE)
        verify = True
    else:
        manifest = read_json_manifest(directory, ENGINE, "an engine directory")
    check_engine_manifest(manifest, directory, require_complete=require_complete)
    verify_file_table(directory, manifest["files"], unchecked=UNCHECKED, source=MANIFEST_FILE, hashes=verify)
    return manifest
