"""harden.signing: Ed25519 key files, key ids, signatures and their verification."""

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harden.errors import HardenError, IntegrityError
from harden.signing import generate_keypair, key_id, load_private_key, load_public_key, sign, verify_signature


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    return tmp_path / "k", tmp_path / "k.pub"


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, msg
    assert isinstance(exc_info.value, HardenError) and isinstance(exc_info.value, ValueError)


def test_keypair_files_modes_and_round_trip(tmp_path):
    old = os.umask(0o022)
    try:
        pub = generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k.pub").stat().st_mode) == 0o644  # 0666 less the umask 022
    assert (tmp_path / "k").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(tmp_path / "k"), load_public_key(tmp_path / "k.pub")
    assert key_id(private.public_key()) == key_id(public) == key_id(pub)
    kid = key_id(public)
    assert len(kid) == 16 and int(kid, 16) >= 0
    assert key_id(Ed25519PrivateKey.generate().public_key()) != kid


def test_generate_keypair_never_overwrites(keys, tmp_path):
    private, public = keys
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(IntegrityError) as exc:
        generate_keypair(private, tmp_path / "other.pub")
    _one_line(exc, private, "existing")
    with pytest.raises(IntegrityError) as exc:
        generate_keypair(tmp_path / "other", public)
    _one_line(exc, public, "existing")
    assert (private.read_bytes(), public.read_bytes()) == before
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.pub").exists()
    with pytest.raises(IntegrityError, match="different paths"):
        generate_keypair(tmp_path / "same", tmp_path / "same")


def test_loading_refuses_missing_garbage_and_wrong_keys(keys, tmp_path):
    private, public = keys
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    big = tmp_path / "big.pem"
    big.write_bytes(b"A" * (64 * 1024 + 1))
    cases = [
        (load_public_key, tmp_path / "nothing.pub", "readable"),
        (load_private_key, tmp_path / "nothing", "readable"),
        (load_public_key, garbage, "PEM public key"),
        (load_private_key, garbage, "PEM private key"),
        (load_public_key, private, "got a private key"),
        (load_private_key, public, "PEM private key"),
        (load_public_key, ec_pub, "Ed25519 public key"),
        (load_private_key, ec_pem, "Ed25519 private key"),
        (load_private_key, encrypted, "encrypted"),
        (load_public_key, big, "bytes"),
        (load_public_key, tmp_path, "readable"),  # a directory
    ]
    for loader, path, words in cases:
        with pytest.raises(IntegrityError) as exc:
            loader(path)
        _one_line(exc, path, words)


def test_a_signature_verifies_only_over_the_same_bytes_and_key():
    key = Ed25519PrivateKey.generate()
    record = sign(key, b"certificate bytes")
    assert set(record) == {"algorithm", "key_id", "signature"}
    assert record["algorithm"] == "ed25519" and record["key_id"] == key_id(key.public_key())
    assert len(base64.b64decode(record["signature"])) == 64  # an Ed25519 signature
    assert verify_signature(key.public_key(), b"certificate bytes", record) is None
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_signature(key.public_key(), b"certificate bytez", record)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(IntegrityError, match="another key"):
        verify_signature(other.public_key(), b"certificate bytes", record)
    # the key id names the key, it proves nothing: edited to the other key's, the check still fails
    renamed = {**record, "key_id": key_id(other.public_key())}
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_signature(other.public_key(), b"certificate bytes", renamed)


def test_malformed_signature_records_are_refused():
    key = Ed25519PrivateKey.generate()
    record = sign(key, b"x")
    sig = bytearray(base64.b64decode(record["signature"]))
    sig[0] ^= 1
    bad = [
        (None, "signature record"),
        ({**record, "extra": "1"}, "signature record"),
        ({k: v for k, v in record.items() if k != "key_id"}, "signature record"),
        ({**record, "algorithm": "rsa"}, "algorithm"),
        ({**record, "signature": "***"}, "base64"),
        ({**record, "signature": base64.b64encode(bytes(sig)).decode()}, "does not verify"),
        ({**record, "signature": base64.b64encode(b"short").decode()}, "does not verify"),
    ]
    for rec, words in bad:
        with pytest.raises(IntegrityError, match=words):
            verify_signature(key.public_key(), b"x", rec)
    with pytest.raises(IntegrityError, match="Ed25519 private key"):
        sign(key.public_key(), b"x")  # type: ignore[arg-type]
