"""Engine, calibration and processor folders treated as untrusted input.

A folder may come from a colleague, a CI system or a download. Everything read from one goes
through this module, and every refusal is one `CapaError` line naming the file (and the key) and
what would be right:

    scan_folder(root)                    every file, refusing links, special files, hidden entries
    confined_file(root, relative)        a path named by a JSON file, checked component by component
    read_json(path, schema=...)          bounded size and depth, strict JSON, then a JSON Schema
    verify_file_table(root, files)       the folder holds exactly the listed files, with their sha256
    read_verified_bytes / load_library_verified
                                         hash the bytes that are used, not a file reopened later
    load_graph_proto(root, graph)        an ONNX graph (confined, bounded) without its external data
    check_external_data(root, graph)     an ONNX graph's external data stays inside the folder
    load_local_processor(directory)      no remote code, no download, template errors as one line
    open_image(path, max_pixels=...)     the pixel count checked from the header, before decoding

Writing: `atomic_write_bytes` / `atomic_write_json` (a unique temporary file, never a planted
link; fsync; rename) and `folder_lock` (flock on the directory while a folder is rewritten).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import stat
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, NamedTuple

from .errors import CapaError

#: A manifest lists a few dozen files (~10 KB); 16 MiB leaves room for large models' tables.
MAX_JSON_BYTES = 16 << 20
#: Our files nest at most ~6 levels, HF tokenizer files ~8.
MAX_JSON_DEPTH = 64
#: An engine folder holds a few dozen entries.
MAX_FOLDER_ENTRIES = 10_000
#: tokenizer.json of large vocabularies reaches ~35 MB.
MAX_PROCESSOR_JSON_BYTES = 64 << 20
#: 64 megapixels (2**26): far above any model's input size, below PIL's own bomb limit (~89 MP);
#: decoded as RGB this is at most 192 MiB.
MAX_IMAGE_PIXELS = 1 << 26
#: What a processor folder written by `save_pretrained` holds: configs, templates, vocabularies.
#: Anything else (code, pickles, libraries) is refused rather than judged.
PROCESSOR_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(value: Any, limit: int = 60) -> str:
    """A short, one-line rendering of a value read from an untrusted file."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- writing -----------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write data to path through a new temporary file in the same directory, then rename.

    The temporary file is created by `tempfile.mkstemp` (O_CREAT|O_EXCL|O_NOFOLLOW, a random name):
    a link planted under any name is never followed, and concurrent writers never share a file.
    Readers see the old or the new content, never half; a link at `path` itself is replaced, not
    followed. The data is fsynced before the rename, the directory after it."""
    path = Path(path)
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CapaError(f"cannot write {path}: {exc.strerror} (the directory {directory} must exist and be writable)") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)  # mkstemp makes it private; outputs are meant to be shared
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise CapaError(f"cannot write {path}: {exc.strerror}") from None
        raise
    _fsync_directory(directory)
    return path


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; the rename is done
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finite(value):
    """Strict JSON: an undefined number (NaN, inf) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps_json(obj) -> bytes:
    """The bytes `atomic_write_json` writes: indented strict JSON (NaN/inf -> null), other types by str()."""
    return (json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n").encode()


def atomic_write_json(path: str | Path, obj, *, mode: int = 0o644) -> Path:
    """`atomic_write_bytes` of `dumps_json(obj)`."""
    return atomic_write_bytes(path, dumps_json(obj), mode=mode)


@contextlib.contextmanager
def folder_lock(directory: str | Path, *, blocking: bool = True, shared: bool = False) -> Iterator[Path]:
    """Hold flock on the directory itself while a folder is rewritten in place (e.g. `validate`).

    No lock file is needed: the lock is on an fd of the directory, released when it is closed
    (also when the process dies). A second exclusive holder waits, or with blocking=False gets a
    CapaError. shared=True is for readers that must not see a rewrite half done. A folder replaced
    by rename (a new build) is a new directory: lock its parent's entry by other means."""
    directory = Path(directory)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CapaError(f"cannot lock folder {directory}: {exc.strerror}; give an existing directory") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise CapaError(f"{directory} is being written by another capa-export process; wait for it to "
                            f"finish, then try again") from None
        yield directory
    finally:
        os.close(fd)


# --- paths -------------------------------------------------------------------------------------
def _relative_parts(relative, where: str) -> list[str]:
    """The components of a relative path read from a file, or a CapaError saying what is wrong."""
    if not isinstance(relative, str):
        raise CapaError(f"{where}: a path must be a string, got {_show(relative)}")
    shown = _show(relative)
    if not relative:
        raise CapaError(f"{where}: the path is empty; give a relative path inside the folder")
    if len(relative) > 1024:
        raise CapaError(f"{where}: the path {shown} is longer than 1024 characters")
    if _CONTROL.search(relative):
        raise CapaError(f"{where}: the path {shown} contains a control character (NUL, newline...)")
    if relative.startswith("/"):
        raise CapaError(f"{where}: the path {shown} is absolute; give a path relative to the folder")
    parts = relative.split("/")
    if ".." in parts:
        raise CapaError(f"{where}: the path {shown} contains '..'; give a path inside the folder")
    if any(part in ("", ".") for part in parts):
        raise CapaError(f"{where}: the path {shown} has an empty or '.' component; write it as a plain a/b/c path")
    hidden = [part for part in parts if part.startswith(".")]
    if hidden:
        raise CapaError(f"{where}: the path {shown} names a hidden entry ({_show(hidden[0])}); a folder's "
                        f"files are never hidden")
    return parts


def _describe_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file (FIFO, socket or device)"


def _walk(root: Path, parts: list[str], where: str, want_dir: bool) -> Path:
    """Open each component below root with O_NOFOLLOW through directory fds (no component may be a
    link), check the final entry's type, and return root / parts."""
    shown = _show("/".join(parts))
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CapaError(f"{where}: the folder {root} cannot be opened ({exc.strerror})") from None
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                info = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise CapaError(f"{where}: {shown} does not exist in {root}") from None
            except OSError as exc:
                raise CapaError(f"{where}: {shown} cannot be read in {root} ({exc.strerror})") from None
            if stat.S_ISLNK(info.st_mode):
                raise CapaError(f"{where}: {_show('/'.join(parts[:index + 1]))} in {root} is a symbolic link; "
                                f"links are never followed out of a folder: replace it by the file itself")
            if not last or want_dir:
                if not stat.S_ISDIR(info.st_mode):
                    raise CapaError(f"{where}: {_show('/'.join(parts[:index + 1]))} in {root} is "
                                    f"{_describe_type(info.st_mode)}, not a directory")
                if last:
                    break
                try:
                    next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except OSError as exc:  # swapped for a link after the stat: refuse the same way
                    raise CapaError(f"{where}: {shown} in {root} cannot be opened as a directory ({exc.strerror})") from None
                os.close(dir_fd)
                dir_fd = next_fd
            elif not stat.S_ISREG(info.st_mode):
                raise CapaError(f"{where}: {shown} in {root} is {_describe_type(info.st_mode)}, not a regular file")
    finally:
        os.close(dir_fd)
    return root.joinpath(*parts)


def confined_file(root: str | Path, relative, *, source: str | None = None) -> Path:
    """root / relative after checking that relative (a path read from a file) stays inside root:
    a string, relative, no '..', no empty/'.'/hidden component, no NUL or control character, no
    symbolic link at any component (file or directory), and the final entry a regular file.
    source names where the path was read (e.g. 'manifest.json: backend_dir') for the message."""
    root = Path(root)
    where = source or str(root)
    return _walk(root, _relative_parts(relative, where), where, want_dir=False)


def confined_directory(root: str | Path, relative, *, source: str | None = None) -> Path:
    """As `confined_file`, for a directory (e.g. the manifest's backend_dir)."""
    root = Path(root)
    where = source or str(root)
    return _walk(root, _relative_parts(relative, where), where, want_dir=True)


def scan_folder(root: str | Path, *, max_entries: int = MAX_FOLDER_ENTRIES) -> list[str]:
    """Every regular file under root, as sorted relative POSIX names.

    Refuses (naming the entry) symbolic links to files or directories, special files (FIFO,
    socket, device), hidden entries (a name starting with '.'), names with control characters,
    and more than max_entries entries in all. Iterative: no depth of nesting can overflow."""
    root = Path(root)
    if not root.is_dir():
        raise CapaError(f"folder {root} does not exist or is not a directory")
    files: list[str] = []
    count = 0
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            entries = list(os.scandir(root / relative if relative else root))
        except OSError as exc:
            raise CapaError(f"{root}: {_show(relative)} cannot be listed ({exc.strerror})") from None
        for entry in entries:
            count += 1
            if count > max_entries:
                raise CapaError(f"{root} holds more than {max_entries} entries; an engine folder holds a few dozen: "
                                f"is this the right folder?")
            name = f"{relative}/{entry.name}" if relative else entry.name
            if _CONTROL.search(entry.name):
                raise CapaError(f"{root}: {_show(name)} has a control character in its name; rename or remove it")
            if entry.name.startswith("."):
                raise CapaError(f"{root}: {_show(name)} is a hidden entry; a folder's files are never hidden: "
                                f"remove it (a leftover temporary file of an interrupted write?)")
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                raise CapaError(f"{root}: {_show(name)} cannot be read ({exc.strerror})") from None
            if stat.S_ISDIR(mode):
                pending.append(name)
            elif stat.S_ISREG(mode):
                files.append(name)
            else:
                raise CapaError(f"{root}: {_show(name)} is {_describe_type(mode)}; a folder may hold only regular "
                                f"files and directories: replace it by the file itself or remove it")
    return sorted(files)


# --- reading -----------------------------------------------------------------------------------
def _open_regular(path: Path, name: str) -> tuple[int, int]:
    """(fd, size) of a regular file opened without following a link at its last component.

    The type is checked with lstat before the open (opening a FIFO would block, a device may act),
    and again on the fd (the entry may have been swapped in between)."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise CapaError(f"{name} does not exist") from None
    except OSError as exc:
        raise CapaError(f"{name} cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(before.st_mode):
        raise CapaError(f"{name} is a symbolic link; links are never followed out of a folder: replace it by the file")
    if not stat.S_ISREG(before.st_mode):
        raise CapaError(f"{name} is {_describe_type(before.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        reason = "it became a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise CapaError(f"{name} cannot be opened ({reason})") from None
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise CapaError(f"{name} changed while it was opened; is another process writing the folder?")
    return fd, after.st_size


def _read_fd(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_bytes(path: str | Path, *, max_bytes: int, name: str | None = None) -> bytes:
    """A regular file's content (no link followed at its last component), refused when larger than
    max_bytes: the size is checked on the open fd before anything is read."""
    path = Path(path)
    name = name or str(path)
    fd, size = _open_regular(path, name)
    try:
        if size > max_bytes:
            raise CapaError(f"{name} is {size} bytes; at most {max_bytes} are read: not the expected file?")
        data = _read_fd(fd, max_bytes)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after the fstat
        raise CapaError(f"{name} is over {max_bytes} bytes; at most {max_bytes} are read: not the expected file?")
    return data


class _Refused(ValueError):
    """Raised from the JSON decoder's hooks; turned into a CapaError with the file's name."""


def _no_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            # json keeps the last value, other readers the first: an ambiguous file is refused
            raise _Refused(f"key {_show(key)} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name):
    raise _Refused(f"{name} is not JSON (undefined numbers are written as null)")


def _depth(value) -> int:
    """Nesting depth (a scalar 0, [] or {} 1), without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        pending.extend((child, level + 1) for child in children)
    return deepest


def parse_json(data: bytes, name: str, *, max_depth: int = MAX_JSON_DEPTH, schema: dict | None = None):
    """Strict JSON from bytes: UTF-8, no NaN/Infinity, no duplicate keys, at most max_depth levels,
    then checked against a JSON Schema (see capa_export.schemas). CapaError names the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CapaError(f"{name} is not UTF-8 text (byte {exc.start}); JSON files are UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError:
        raise CapaError(f"{name} nests deeper than {max_depth} levels; not a file capa-export wrote") from None
    except _Refused as exc:
        raise CapaError(f"{name}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CapaError(f"{name} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise CapaError(f"{name} is not valid JSON ({str(exc).split(':')[0][:120]})") from None
    if _depth(obj) > max_depth:
        raise CapaError(f"{name} nests deeper than {max_depth} levels; not a file capa-export wrote")
    if schema is not None:
        check_schema(obj, schema, name)
    return obj


def read_json(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              schema: dict | None = None, name: str | None = None):
    """A JSON file from a folder: opened without following a link, its size checked on the open fd
    before reading, parsed strictly with a depth cap (no RecursionError escapes), then checked
    against schema. Every failure is one CapaError naming the file (name, default the path)."""
    path = Path(path)
    name = name or str(path)
    return parse_json(read_bytes(path, max_bytes=max_bytes, name=name), name, max_depth=max_depth, schema=schema)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def key_path(parts) -> str:
    """files["onnx/vision.onnx"].sha256, providers[1], ... for a message."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part[:80])}]"
    return text


_VALIDATORS: dict[int, tuple[dict, Any]] = {}
_DEFAULT_EXPECT = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer",
                   "number": "a number", "boolean": "true or false", "null": "null"}


def _expectation(error) -> str:
    schema = error.schema if isinstance(error.schema, dict) else {}
    if "expect" in schema:
        return schema["expect"]
    keyword, value = error.validator, error.validator_value
    if keyword == "type":
        names = value if isinstance(value, list) else [value]
        return " or ".join(_DEFAULT_EXPECT.get(n, n) for n in names)
    if keyword == "enum":
        return "one of " + ", ".join(json.dumps(v) for v in value)
    if keyword == "const":
        return json.dumps(value)
    if keyword in ("minimum", "exclusiveMinimum"):
        return f"{'>=' if keyword == 'minimum' else '>'} {value}"
    if keyword in ("maximum", "exclusiveMaximum"):
        return f"{'<=' if keyword == 'maximum' else '<'} {value}"
    if keyword in ("minItems", "maxItems"):
        return f"an array of {'at least' if keyword == 'minItems' else 'at most'} {value} items"
    if keyword in ("minLength", "maxLength"):
        return f"a string of {'at least' if keyword == 'minLength' else 'at most'} {value} characters"
    if keyword in ("minProperties", "maxProperties"):
        return f"an object of {'at least' if keyword == 'minProperties' else 'at most'} {value} keys"
    if keyword == "pattern":
        return f"a string matching {value}"
    return f"valid ({keyword})"


def check_schema(obj, schema: dict, name: str) -> None:
    """CapaError naming the key path of the first problem (in key order) and what would be right."""
    from jsonschema import Draft202012Validator

    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        # the schema is kept with its validator: its id cannot be reused by another dict
        cached = _VALIDATORS[id(schema)] = (schema, Draft202012Validator(schema))
    validator = cached[1]
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    error = errors[0]
    where = list(error.absolute_path)
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        raise CapaError(f"{name}: key {key_path(where + [missing])} is missing")
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = error.schema.get("properties", {})
        extra = next(k for k in error.instance if k not in allowed)
        raise CapaError(f"{name}: key {key_path(where + [extra])} is unknown; known: {', '.join(allowed)}")
    if error.validator == "propertyNames" or "propertyNames" in list(error.relative_schema_path):
        # the instance is the offending key itself
        raise CapaError(f"{name}: {key_path(where) or 'the top level'} has a key {_show(error.instance)}, which must be "
                        f"{_expectation(error)}")
    shown = "" if isinstance(error.instance, (dict, list)) else f" (got {_show(error.instance)})"
    raise CapaError(f"{name}: {key_path(where) or 'the top level'} must be {_expectation(error)}{shown}")


def read_verified_bytes(path: str | Path, sha256: str, *, expected_bytes: int | None = None,
                        max_bytes: int = 1 << 30, name: str | None = None) -> bytes:
    """The file's bytes, read once, after checking that exactly those bytes have the sha256 (and
    size) the manifest lists. Use the returned bytes: reopening the path would check one file and
    use another."""
    path = Path(path)
    name = name or str(path)
    fd, size = _open_regular(path, name)
    try:
        if expected_bytes is not None and size != expected_bytes:
            raise CapaError(f"{name} is {size} bytes but its manifest lists {expected_bytes} (corrupted or "
                            f"modified); rebuild the engine")
        if size > max_bytes:
            raise CapaError(f"{name} is {size} bytes; at most {max_bytes} are read into memory")
        data = _read_fd(fd, max_bytes)
    finally:
        os.close(fd)
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(sha256).lower()):
        raise CapaError(f"{name} does not match its sha256 in the manifest (corrupted or modified); rebuild the engine")
    return data


class VerifiedLibrary(NamedTuple):
    """A native library loaded from verified bytes. path (/proc/self/fd/N, valid for the life of
    the process) can be handed to loaders that take a path (TensorRT's plugin registry): they map
    the same sealed bytes, and the dynamic loader returns the library already loaded under that name."""

    handle: ctypes.CDLL
    path: str
    sha256: str


_LIBRARIES: dict[str, VerifiedLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()


def load_library_verified(path: str | Path, sha256: str, *, expected_bytes: int | None = None,
                          mode: int = ctypes.DEFAULT_MODE, name: str | None = None) -> VerifiedLibrary:
    """Load native code from the bytes whose sha256 was checked, never from the path again.

    The bytes go into a sealed anonymous file (memfd_create; no write, grow or shrink after
    sealing), loaded as /proc/self/fd/N; that fd stays open so the name is never reused for
    another library (the dynamic loader matches libraries by name). Where memfd is unavailable or
    not executable (vm.memfd_noexec), a private temporary copy (0700 directory) is loaded instead.
    The same verified bytes are loaded once per process."""
    data = read_verified_bytes(path, sha256, expected_bytes=expected_bytes, max_bytes=1 << 30, name=name)
    digest = hashlib.sha256(data).hexdigest()
    label = name or str(path)
    with _LIBRARIES_LOCK:
        if digest in _LIBRARIES:
            return _LIBRARIES[digest]
        try:
            library = _load_from_memfd(data, digest, mode)
        except OSError:
            library = _load_from_private_copy(data, digest, mode, label)
        _LIBRARIES[digest] = library
        return library


def _load_from_memfd(data: bytes, digest: str, mode: int) -> VerifiedLibrary:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    fd = os.memfd_create(f"capa-verified-{digest[:16]}", flags)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        path = f"/proc/self/fd/{fd}"
        handle = ctypes.CDLL(path, mode=mode)
    except BaseException:
        os.close(fd)
        raise
    return VerifiedLibrary(handle, path, digest)  # fd deliberately kept open (see load_library_verified)


def _load_from_private_copy(data: bytes, digest: str, mode: int, label: str) -> VerifiedLibrary:
    directory = tempfile.mkdtemp(prefix="capa-verified-")  # 0700: no other user can swap the copy
    path = os.path.join(directory, f"{digest[:16]}.so")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o500)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            library = ctypes.CDLL(path, mode=mode)
        except OSError as exc:
            raise CapaError(f"native library {label} cannot be loaded ({str(exc).splitlines()[0][:160]})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(directory)
    return VerifiedLibrary(library, path, digest)


def verify_file_table(root: str | Path, files: dict, *, unchecked=("manifest.json", "validation.json", "revalidation.json", "manifest.sig"),
                      source: str = "manifest.json", hashes: bool = True) -> None:
    """The folder holds exactly the files the table lists ({relative name: {bytes, sha256}}, as the
    ENGINE_MANIFEST schema checks), plus the top-level unchecked reports, each with its size and
    sha256. Names are checked before anything is opened (no '..' or absolute path is ever hashed),
    links and special files anywhere are refused, sizes are compared before hashing.

    hashes=False (`run --no-verify`) skips reading the files' content only: names, types, the
    one-to-one match and sizes are still checked."""
    root = Path(root)
    if not isinstance(files, dict) or not files:
        raise CapaError(f"{source}: files must list at least one file with its bytes and sha256; rebuild the engine")
    for relative in files:
        _relative_parts(relative, f"{source}: files")
    present = [n for n in scan_folder(root) if n not in unchecked]
    unlisted = [n for n in present if n not in files]
    if unlisted:
        raise CapaError(f"{root} holds files {source} does not list ({', '.join(_show(n) for n in unlisted[:3])}); "
                        f"remove them or rebuild the engine")
    missing = sorted(set(files) - set(present))
    if missing:
        # the name passed _relative_parts above: no control character to hide
        raise CapaError(f"{root}: {missing[0]} is missing (listed in {source}); rebuild the engine")
    for relative, entry in files.items():
        path = confined_file(root, relative, source=f"{source}: files")
        fd, size = _open_regular(path, f"{root}: {relative}")
        try:
            if size != entry["bytes"]:
                raise CapaError(f"{root}: {_show(relative)} is {size} bytes but {source} lists {entry['bytes']} "
                                f"(corrupted or modified); rebuild the engine")
            if not hashes:
                continue
            digest = hashlib.sha256()
            while block := os.read(fd, 1 << 20):
                digest.update(block)
        finally:
            os.close(fd)
        if not hmac.compare_digest(digest.hexdigest(), str(entry["sha256"])):
            raise CapaError(f"{root}: {_show(relative)} does not match its sha256 in {source} (corrupted or modified); "
                            f"rebuild the engine")


# --- ONNX graphs -------------------------------------------------------------------------------
def _graph_tensors(model):
    """Every TensorProto of a model: initializers and attribute tensors of all graphs and functions."""
    pending = [model.graph]
    pending_nodes = [node for function in model.functions for node in function.node]
    while pending or pending_nodes:
        if pending:
            graph = pending.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            pending_nodes.extend(graph.node)
            continue
        node = pending_nodes.pop()
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                pending.append(attribute.g)
            pending.extend(attribute.graphs)


#: An ONNX graph without its external data: the largest we write (a 7B decoder's) is a few MB.
MAX_GRAPH_BYTES = 256 << 20


def load_graph_proto(root: str | Path, graph: str, *, max_bytes: int = MAX_GRAPH_BYTES):
    """The ModelProto of root/graph (a path read from a file, confined like `confined_file`),
    without its external data, read from a regular file of at most max_bytes."""
    import onnx

    root = Path(root)
    path = confined_file(root, graph, source=f"{root}: graph")
    data = read_bytes(path, max_bytes=max_bytes, name=f"{root}/{graph}")
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends: report the file, not a traceback
        raise CapaError(f"{root}: {_show(graph)} is not a readable ONNX graph ({type(exc).__name__}); rebuild the engine") from None


def check_external_data(root: str | Path, graph: str, model=None) -> list[str]:
    """Check that an ONNX graph's external data stays inside root before a runtime opens it.

    graph is relative to root; model, when given, is its ModelProto already read (by
    `load_graph_proto`). Every tensor stored outside the graph must name a location relative
    to the graph's directory, inside root (no '..', no absolute path, no link), an existing regular
    file, and an offset + length within that file. Returns the data files (relative to root)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    root = Path(root)
    if model is None:
        model = load_graph_proto(root, graph)
    graph_dir = PurePosixPath(graph).parent
    data_files: dict[str, int] = {}
    for tensor in _graph_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        where = f"{root}: {graph}: tensor {_show(tensor.name)}"
        if not info.location:
            raise CapaError(f"{where} is stored externally but names no location")
        _relative_parts(info.location, where)
        relative = str(graph_dir / info.location) if str(graph_dir) != "." else info.location
        if relative not in data_files:
            data_path = confined_file(root, relative, source=where)
            data_files[relative] = os.lstat(data_path).st_size
        size = data_files[relative]
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise CapaError(f"{where}: bytes {offset}..{offset + length} lie outside {_show(relative)} ({size} bytes); "
                            f"rebuild the engine")
    return sorted(data_files)


# --- processors and images ---------------------------------------------------------------------
def find_key(value, key: str) -> list | None:
    """The key path of the first object holding key, searched without recursion."""
    pending = [(value, [])]
    while pending:
        item, where = pending.pop()
        if isinstance(item, dict):
            if key in item:
                return where + [key]
            pending.extend((v, where + [k]) for k, v in item.items())
        elif isinstance(item, list):
            pending.extend((v, where + [i]) for i, v in enumerate(item))
    return None


#: The message the runtime renders (an image then text): used to try the chat template at load time.
PROBE_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


def load_local_processor(directory: str | Path, *, allowed_suffixes=PROCESSOR_SUFFIXES,
                         probe_messages=PROBE_MESSAGES, loader=None):
    """A Hugging Face processor from a local folder, with no code from the folder and no download.

    Refused before transformers sees the folder: links, special or hidden entries (scan_folder),
    any file whose suffix is not in allowed_suffixes (so no *.py), any JSON file carrying `auto_map`
    at any depth (it names custom classes). Then loader(directory, trust_remote_code=False,
    local_files_only=True) (default AutoProcessor.from_pretrained; a model family may give its own);
    its errors, and a chat template that does not compile or that the
    sandbox stops (SecurityError) on probe_messages, become one CapaError line."""
    directory = Path(directory)
    names = scan_folder(directory, max_entries=1000)
    for name in names:
        if PurePosixPath(name).suffix not in allowed_suffixes:
            raise CapaError(f"{directory}: {_show(name)} is not a processor file (allowed: "
                            f"{', '.join(allowed_suffixes)}); capa-export never loads code from a folder: remove it")
    for name in names:
        if name.endswith(".json"):
            config = read_json(directory / name, max_bytes=MAX_PROCESSOR_JSON_BYTES, name=f"{directory}/{name}")
            found = find_key(config, "auto_map")
            if found is not None:
                raise CapaError(f"{directory}/{name}: {key_path(found)} names custom code; capa-export never runs code "
                                f"from a folder: save the processor with a built-in transformers class")
    from jinja2.exceptions import SecurityError, TemplateError
    if loader is None:
        from transformers import AutoProcessor

        loader = AutoProcessor.from_pretrained
    try:
        processor = loader(str(directory), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, TypeError...: one line
        raise CapaError(f"processor folder {directory} cannot be loaded ({type(exc).__name__}: "
                        f"{_first_line(exc)}); rebuild the engine") from None
    if getattr(processor, "chat_template", None) and probe_messages:
        try:
            processor.apply_chat_template(probe_messages, add_generation_prompt=True, tokenize=False)
        except (SecurityError, TemplateError) as exc:
            raise CapaError(f"processor folder {directory}: the chat template fails ({type(exc).__name__}: "
                            f"{_first_line(exc)}); a template may only format messages: rebuild the engine") from None
        except Exception:
            pass  # a template that rejects this probe message (e.g. no image role) is judged when used
    return processor


@contextlib.contextmanager
def chat_template_errors(source: str = "the processor's chat template"):
    """Inside: a chat template's failures (the sandbox's SecurityError, syntax errors,
    raise_exception) become one CapaError line. For call sites that render a template through
    code of their own (a model family's prompt)."""
    from jinja2.exceptions import TemplateError

    try:
        yield
    except TemplateError as exc:
        raise CapaError(f"{source} fails ({type(exc).__name__}: {_first_line(exc)})") from None


def render_chat_template(processor, messages, **kwargs):
    """processor.apply_chat_template with the template's failures (the sandbox's SecurityError,
    syntax errors, raise_exception) as one CapaError line."""
    with chat_template_errors():
        return processor.apply_chat_template(messages, **kwargs)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:200]


#: Image formats decoded by default: common, and decoded by PIL itself (EPS, for one, would run
#: Ghostscript on the file).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def decode_bounded(source, formats, max_pixels: int, too_large):
    """An RGB PIL image from a path or file object, decoded only when it is one of formats and its
    header claims at most max_pixels pixels (too_large(pixels text) -> the CapaError to raise;
    PIL's own decompression-bomb limits raise the same). Other decoding errors propagate as PIL
    raises them, for the caller to name its input."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=list(formats)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise too_large(f"{width} x {height} = {width * height}")
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large(f"more than {Image.MAX_IMAGE_PIXELS}") from None


def open_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, formats=IMAGE_FORMATS):
    """An image file as an RGB PIL image, refused with one line when it is not a readable image of
    one of formats, or when its header claims more than max_pixels pixels (checked before any pixel
    is decoded; PIL's own decompression-bomb limits give the same line)."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    try:
        info = os.stat(path)
    except OSError:
        raise CapaError(f"image {path} does not exist; give a PNG or JPEG file") from None
    if not stat.S_ISREG(info.st_mode):
        raise CapaError(f"image {path} is {_describe_type(info.st_mode)}; give a PNG or JPEG file")

    def too_large(pixels: str) -> CapaError:
        return CapaError(f"image {path} has {pixels} pixels; at most {max_pixels} are decoded (max_pixels): "
                         f"give a smaller image")

    try:
        return decode_bounded(path, formats, max_pixels, too_large)
    except CapaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # PIL reports a broken file as any of these (SyntaxError for a bad PNG chunk)
        raise CapaError(f"image {path} cannot be read as an image ({type(exc).__name__}: {_first_line(exc)[:100]}); "
                        f"give a file in one of: {', '.join(formats)}") from None
