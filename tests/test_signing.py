"""capa_export.signing: Ed25519 signatures of engine folders.

The independent reference is OpenSSL's command line: a signature sign_folder writes must verify
there as a plain Ed25519 signature of the signed bytes (skipped where openssl is missing)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from capa_export import signing
from capa_export.errors import CapaError

from .test_folders import ENGINE_FILES, make_folder


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def signed(tmp_path):
    """(engine folder, private key path, public key path), signed."""
    private, public = signing.generate_keypair(tmp_path / "keys")
    engine = tmp_path / "engine"
    make_folder(engine, ENGINE_FILES)
    signing.sign_folder(engine, private)
    return engine, private, public


def test_keys_are_pem_private_key_is_private_and_never_overwritten(tmp_path):
    private, public = signing.generate_keypair(tmp_path)
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(CapaError, match="already exists"):
        signing.generate_keypair(tmp_path)


def test_a_signed_folder_verifies_and_returns_its_manifest(signed):
    engine, _, public = signed
    manifest = signing.verify_folder(engine, public)
    assert manifest == json.loads((engine / "manifest.json").read_text())
    assert signing.verify_folder(engine, public.read_bytes()) == manifest  # PEM bytes work as well as a path


def test_the_signature_is_plain_ed25519_as_openssl_sees_it(signed, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no independent Ed25519 verifier")
    engine, _, public = signed
    record = json.loads((engine / "manifest.sig").read_text())
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(record["signature"]))
    (tmp_path / "signed.bin").write_bytes(signing.CONTEXT + (engine / "manifest.json").read_bytes())
    command = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(public), "-rawin",
               "-in", str(tmp_path / "signed.bin"), "-sigfile", str(tmp_path / "sig.bin")]
    assert subprocess.run(command, capture_output=True).returncode == 0
    (tmp_path / "signed.bin").write_bytes(signing.CONTEXT + (engine / "manifest.json").read_bytes() + b" ")
    assert subprocess.run(command, capture_output=True).returncode != 0


def test_a_modified_manifest_is_refused(signed):
    engine, _, public = signed
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["complete"] = True
    manifest["model"]["name"] = "something-else"
    (engine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CapaError) as exc:
        signing.verify_folder(engine, public)
    assert "does not match its signature" in one_line(exc)


def test_a_modified_or_added_engine_file_is_refused(signed):
    """The signature covers the manifest; the manifest's table covers the files."""
    engine, _, public = signed
    (engine / "onnx" / "vision.onnx").write_bytes(b"vision grapH")
    with pytest.raises(CapaError, match="does not match its sha256"):
        signing.verify_folder(engine, public)
    (engine / "onnx" / "vision.onnx").write_bytes(ENGINE_FILES["onnx/vision.onnx"])
    signing.verify_folder(engine, public)
    (engine / "onnxruntime" / "libextra.so").write_bytes(b"\x7fELF")
    with pytest.raises(CapaError, match="does not list"):
        signing.verify_folder(engine, public)


def test_missing_altered_or_foreign_signatures_are_refused(signed, tmp_path):
    engine, _, public = signed
    record = json.loads((engine / "manifest.sig").read_text())
    flipped = bytearray(base64.b64decode(record["signature"]))
    flipped[0] ^= 1
    (engine / "manifest.sig").write_text(json.dumps({**record, "signature": base64.b64encode(bytes(flipped)).decode()}))
    with pytest.raises(CapaError, match="does not match its signature"):
        signing.verify_folder(engine, public)
    (engine / "manifest.sig").write_text(json.dumps({**record, "signature": 12}))
    with pytest.raises(CapaError, match=r"manifest.sig: signature must be a base64 Ed25519 signature"):
        signing.verify_folder(engine, public)
    (engine / "manifest.sig").write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(CapaError, match="manifest.sig"):
        signing.verify_folder(engine, public)
    (engine / "manifest.sig").unlink()
    with pytest.raises(CapaError) as exc:
        signing.verify_folder(engine, public)
    assert "is not signed" in one_line(exc)
    _, other_public = signing.generate_keypair(tmp_path / "other")
    signing.sign_folder(engine, signed[1])
    with pytest.raises(CapaError, match="made with another key"):
        signing.verify_folder(engine, other_public)


def test_unusable_keys_are_one_line(signed, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    engine, _, _ = signed
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(CapaError, match="not an Ed25519 key"):
        signing.sign_folder(engine, ec_key)
    with pytest.raises(CapaError, match="not a usable PEM private key"):
        signing.sign_folder(engine, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CapaError, match="does not exist"):
        signing.verify_folder(engine, tmp_path / "absent.pub.pem")
    private, public = signing.generate_keypair(tmp_path / "locked", password=b"pass phrase")
    with pytest.raises(CapaError, match="not a usable PEM private key"):
        signing.sign_folder(engine, private)
    signing.sign_folder(engine, private, password=b"pass phrase")
    signing.verify_folder(engine, public)


def test_sign_refuses_a_folder_its_manifest_does_not_describe(tmp_path):
    private, _ = signing.generate_keypair(tmp_path / "keys")
    engine = tmp_path / "engine"
    make_folder(engine, ENGINE_FILES)
    (engine / "onnx" / "vision.onnx").write_bytes(b"changed after the build")
    with pytest.raises(CapaError, match="vision.onnx"):
        signing.sign_folder(engine, private)
    assert not (engine / "manifest.sig").exists()
