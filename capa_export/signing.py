"""Ed25519 signatures of engine folders (keys as PEM, through `cryptography`).

The signature covers the exact bytes of `manifest.json`, and the manifest lists every engine
file with its size and sha256: a folder whose signature verifies holds exactly what its signer
built. Without a signature the sha256 table detects corruption, not tampering (whoever can edit
a file can edit its checksum too).

    generate_keypair(dir)                 -> capa-signing-key.pem (private, 0600), capa-signing-key.pub.pem
    sign_folder(engine, private_key)      -> engine/manifest.sig (detached; rewrite after `validate`)
    signed_manifest_bytes(engine, public_key)
                                          -> the manifest's bytes, read once, whose signature verified
    verify_folder(engine, public_key)     -> the manifest parsed from the verified bytes, after
                                             checking every listed file, or one CapaError line

The same keys can be made with OpenSSL (`openssl genpkey -algorithm ed25519 -out key.pem`;
`openssl pkey -in key.pem -pubout -out key.pub.pem`).

`validate` rewrites manifest.json (complete = passed): sign after validating, or sign again.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from .errors import CapaError
from .folders import MAX_JSON_BYTES, atomic_write_json, folder_lock, parse_json, read_bytes, read_json, verify_file_table
from .schemas import ENGINE_MANIFEST, SHA256

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
VALIDATION_FILE = "validation.json"
REVALIDATION_FILE = "revalidation.json"
PRIVATE_KEY_FILE = "capa-signing-key.pem"
PUBLIC_KEY_FILE = "capa-signing-key.pub.pem"
#: Signed before the manifest bytes: a signature made for anything else never verifies here.
CONTEXT = b"capa-export engine manifest v1\n"
MAX_KEY_BYTES = 64 << 10

SIGNATURE_SCHEMA = {
    "type": "object",
    "required": ["format_version", "algorithm", "public_key_sha256", "manifest_sha256", "signature"],
    "additionalProperties": False,
    "properties": {
        "format_version": {"const": 1, "expect": "1"},
        "algorithm": {"const": "ed25519", "expect": "\"ed25519\""},
        "public_key_sha256": SHA256,
        "manifest_sha256": SHA256,
        "signature": {"type": "string", "minLength": 88, "maxLength": 88, "pattern": r"^[A-Za-z0-9+/]{86}==\Z",
                      "expect": "a base64 Ed25519 signature (64 bytes)"},
    },
}


def _key_bytes(key, what: str) -> tuple[bytes, str]:
    """(PEM bytes, a name for messages): bytes are PEM content, a str or path names a PEM file."""
    if isinstance(key, (bytes, bytearray)):
        return bytes(key), f"the given {what}"
    path = Path(key)
    return read_bytes(path, max_bytes=MAX_KEY_BYTES, name=f"{what} {path}"), f"{what} {path}"


def _load_private_key(key, password: bytes | None):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data, name = _key_bytes(key, "private key")
    try:
        private = load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CapaError(f"{name} is not a usable PEM private key ({reason}); make one with generate_keypair") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise CapaError(f"{name} is a {type(private).__name__.lstrip('_')}, not an Ed25519 key; make one with generate_keypair")
    return private


def _load_public_key(key):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data, name = _key_bytes(key, "public key")
    try:
        public = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CapaError(f"{name} is not a PEM public key ({reason}); give the signer's capa-signing-key.pub.pem") from None
    if not isinstance(public, Ed25519PublicKey):
        raise CapaError(f"{name} is a {type(public).__name__.lstrip('_')}, not an Ed25519 key")
    return public


def public_key_fingerprint(public) -> str:
    """sha256 of the raw 32-byte public key: printed to tell keys apart."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create path (never an existing file or a planted link) with mode, and write data."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise CapaError(f"{path} already exists; keys are never overwritten: choose another directory") from None
    except OSError as exc:
        raise CapaError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        os.fsync(handle.fileno())


def generate_keypair(directory: str | Path, *, password: bytes | None = None) -> tuple[Path, Path]:
    """A new Ed25519 key pair as PEM: (private key path, mode 0600, PKCS#8, encrypted when a
    password is given; public key path, SubjectPublicKeyInfo). Existing files are never replaced."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (BestAvailableEncryption, Encoding, NoEncryption,
                                                              PrivateFormat, PublicFormat)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise CapaError(f"{path} already exists; keys are never overwritten: choose another directory")
    key = Ed25519PrivateKey.generate()
    encryption = BestAvailableEncryption(password) if password else NoEncryption()
    _write_new(private_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption), 0o600)
    _write_new(public_path, key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)
    return private_path, public_path


def sign_folder(directory: str | Path, private_key, *, password: bytes | None = None) -> Path:
    """Sign the engine folder's manifest.json; write the detached signature to manifest.sig.

    private_key: PEM bytes, or the path of a PEM file. The manifest must pass the engine schema
    and its file table must match the folder (nothing unchecked is signed)."""
    directory = Path(directory)
    key = _load_private_key(private_key, password)
    with folder_lock(directory):
        data = read_bytes(directory / MANIFEST_FILE, max_bytes=MAX_JSON_BYTES, name=f"{directory}/{MANIFEST_FILE}")
        manifest = parse_json(data, f"{directory}/{MANIFEST_FILE}", schema=ENGINE_MANIFEST)
        verify_file_table(directory, manifest["files"], unchecked=(MANIFEST_FILE, VALIDATION_FILE, REVALIDATION_FILE, SIGNATURE_FILE))
        record = {"format_version": 1, "algorithm": "ed25519",
                  "public_key_sha256": public_key_fingerprint(key.public_key()),
                  "manifest_sha256": hashlib.sha256(data).hexdigest(),
                  "signature": base64.b64encode(key.sign(CONTEXT + data)).decode("ascii")}
        return atomic_write_json(directory / SIGNATURE_FILE, record)


def signed_manifest_bytes(directory: str | Path, public_key) -> bytes:
    """The bytes of the engine folder's manifest.json, read once, after its Ed25519 signature
    (manifest.sig) verified with public_key (PEM bytes or a PEM file's path). Parse these bytes,
    never the file again. Missing or malformed signature, another signer, a manifest modified after
    signing: one CapaError line. The files the manifest lists are not checked here (verify_folder)."""
    from cryptography.exceptions import InvalidSignature

    directory = Path(directory)
    public = _load_public_key(public_key)
    manifest_name, signature_name = f"{directory}/{MANIFEST_FILE}", f"{directory}/{SIGNATURE_FILE}"
    if not os.path.lexists(directory / SIGNATURE_FILE):
        raise CapaError(f"engine {directory} is not signed ({SIGNATURE_FILE} is missing); ask its builder for a "
                        f"signed copy (capa-export build --sign), or leave --trust out to use it unsigned")
    with folder_lock(directory, shared=True):  # not while another process rewrites the folder
        record = read_json(directory / SIGNATURE_FILE, max_bytes=4096, schema=SIGNATURE_SCHEMA, name=signature_name)
        expected = public_key_fingerprint(public)
        if record["public_key_sha256"] != expected:
            raise CapaError(f"{signature_name} was made with another key (public key sha256 "
                            f"{record['public_key_sha256'][:16]}..., expected {expected[:16]}...); get the signer's "
                            f"public key")
        data = read_bytes(directory / MANIFEST_FILE, max_bytes=MAX_JSON_BYTES, name=manifest_name)
    try:
        public.verify(base64.b64decode(record["signature"], validate=True), CONTEXT + data)
    except (InvalidSignature, ValueError):
        raise CapaError(f"{manifest_name} does not match its signature {SIGNATURE_FILE} (modified after signing, "
                        f"or the signature was altered); do not use this engine") from None
    return data


def verify_folder(directory: str | Path, public_key) -> dict:
    """The engine manifest, parsed from the very bytes whose Ed25519 signature verified with
    public_key (PEM bytes or a PEM file's path), after checking every listed file's size and sha256
    and that the folder holds nothing else. Missing or malformed signature, another signer, a
    manifest modified after signing, a modified or added file: one CapaError line."""
    directory = Path(directory)
    data = signed_manifest_bytes(directory, public_key)
    manifest = parse_json(data, f"{directory}/{MANIFEST_FILE}", schema=ENGINE_MANIFEST)
    verify_file_table(directory, manifest["files"], unchecked=(MANIFEST_FILE, VALIDATION_FILE, REVALIDATION_FILE, SIGNATURE_FILE),
                      source=MANIFEST_FILE)
    return manifest


def check_private_key(private_key, *, password: bytes | None = None) -> None:
    """Refuse, in one line and before any work, a signing key that sign_folder could not use."""
    _load_private_key(private_key, password)


def signature_is_current(directory: str | Path) -> bool | None:
    """None when the folder has no manifest.sig; otherwise whether the signature was made over the
    manifest.json now in the folder (its recorded sha256; the signature itself is checked with a
    public key by signed_manifest_bytes). A rewrite that changed the manifest makes it stale."""
    directory = Path(directory)
    if not os.path.lexists(directory / SIGNATURE_FILE):
        return None
    try:
        record = read_json(directory / SIGNATURE_FILE, max_bytes=4096, schema=SIGNATURE_SCHEMA)
        data = read_bytes(directory / MANIFEST_FILE, max_bytes=MAX_JSON_BYTES)
    except CapaError:
        return False
    return record["manifest_sha256"] == hashlib.sha256(data).hexdigest()
