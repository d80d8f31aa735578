"""``harden.signing``: Ed25519 keys and signatures for certificates.

A hash in a certificate says *which* files it is about; anyone can recompute the hashes of edited
files and write them into an edited certificate. A signature says *who* vouches for the
certificate: only the holder of the private key can produce one that verifies under the public
key. :meth:`harden.certificate.Certificate.save` signs the certificate's canonical form
(:meth:`~harden.certificate.Certificate.canonical_bytes`); ``harden inspect --public-key``
verifies it.

The signature record stored in ``certificate.json``::

    {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

``key_id`` is the start of the SHA-256 of the raw public key: it names the key, it proves nothing
(the signature is checked against the public key the reader trusts, never one named by the file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from harden.errors import IntegrityError

__all__ = [
    "ALGORITHM",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify_signature",
]

ALGORITHM = "ed25519"
#: Key files are a few hundred bytes; anything much larger is not a key.
_MAX_KEY_BYTES = 64 * 1024
_SIGNATURE_FIELDS = frozenset({"algorithm", "key_id", "signature"})


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite it) with ``mode`` (less the umask) and write ``data``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    except FileExistsError:
        raise IntegrityError(f"{path}: expected a new key file, got an existing file; not overwritten") from None
    except OSError as exc:
        raise IntegrityError(f"{path}: expected to create a key file, got {exc.strerror or exc}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise IntegrityError(f"{path}: expected to write the key file, got {exc.strerror or exc}") from None
    os.close(fd)


def generate_keypair(private_path: str | Path, public_path: str | Path) -> Ed25519PublicKey:
    """Create a new Ed25519 key pair: the private key (PEM, PKCS8, unencrypted, mode 0600) and the public key (PEM).

    Neither file may exist: an existing key is never overwritten. The private key file is created
    with mode 0600; the public key file with 0666 less the umask.

    Returns:
        The public key.

    Raises:
        IntegrityError: a file exists already or cannot be created (nothing is left half-written).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> pub = generate_keypair(d / "harden.key", d / "harden.pub")
        >>> oct((d / "harden.key").stat().st_mode & 0o777), key_id(load_public_key(d / "harden.pub")) == key_id(pub)
        ('0o600', True)
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise IntegrityError(f"{private_path}: expected different paths for the private and the public key, got one")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise IntegrityError(f"{p}: expected a new key file, got an existing file; not overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o666)
    except IntegrityError:
        private_path.unlink(missing_ok=True)  # no private key without its public half
        raise
    return public


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise IntegrityError(f"{path}: expected a readable {what} file, got {exc.strerror or exc}") from None
    if len(raw) > _MAX_KEY_BYTES:
        raise IntegrityError(
            f"{path}: expected a {what} file (PEM, a few hundred bytes), got over {_MAX_KEY_BYTES} bytes"
        )
    return raw


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM, PKCS8, unencrypted), as written by :func:`generate_keypair`.

    Raises:
        IntegrityError: the file is missing, unreadable, encrypted, or not an Ed25519 private key.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = generate_keypair(d / "k", d / "k.pub")
        >>> isinstance(load_private_key(d / "k"), Ed25519PrivateKey)
        True
    """
    path = Path(path)
    raw = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise IntegrityError(f"{path}: expected an unencrypted private key, got an encrypted one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise IntegrityError(f"{path}: expected a PEM private key (PKCS8), got something else") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM, SubjectPublicKeyInfo), as written by :func:`generate_keypair`.

    Raises:
        IntegrityError: the file is missing, unreadable, or not an Ed25519 public key (a private
            key file is refused too: hand ``inspect`` the public half).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> pub = generate_keypair(d / "k", d / "k.pub")
        >>> key_id(load_public_key(d / "k.pub")) == key_id(pub)
        True
    """
    path = Path(path)
    raw = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in raw:
        raise IntegrityError(f"{path}: expected a public key, got a private key; pass the .pub file")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise IntegrityError(f"{path}: expected a PEM public key, got something else") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw public key: a name for the key, not a proof.

    Example:
        >>> len(key_id(Ed25519PrivateKey.generate().public_key()))
        16
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, data: bytes) -> dict[str, str]:
    """Sign ``data``: the record ``{"algorithm": "ed25519", "key_id": ..., "signature": base64}``.

    Example:
        >>> key = Ed25519PrivateKey.generate()
        >>> record = sign(key, b"hello")
        >>> record["algorithm"], verify_signature(key.public_key(), b"hello", record)
        ('ed25519', None)
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise IntegrityError(f"expected an Ed25519 private key to sign with, got {type(private_key).__name__}")
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(bytes(data))).decode("ascii"),
    }


def verify_signature(public_key: Ed25519PublicKey, data: bytes, signature: Any) -> None:
    """Check that ``signature`` (a record from :func:`sign`) signs ``data`` under ``public_key``.

    The record's ``key_id`` must name ``public_key`` (a mismatch says "signed by another key");
    the check itself is the Ed25519 verification.

    Raises:
        IntegrityError: the record is malformed, names another key, or does not verify.

    Example:
        >>> key = Ed25519PrivateKey.generate()
        >>> record = sign(key, b"hello")
        >>> verify_signature(key.public_key(), b"hello!", record)
        Traceback (most recent call last):
        ...
        harden.errors.IntegrityError: expected a signature over this data, got one that does not verify (the data was changed after signing)
    """
    if not isinstance(signature, dict) or set(signature) != _SIGNATURE_FIELDS:
        got = sorted(map(str, signature)) if isinstance(signature, dict) else type(signature).__name__
        raise IntegrityError(f"expected a signature record with keys {sorted(_SIGNATURE_FIELDS)}, got {got}")
    if signature["algorithm"] != ALGORITHM:
        raise IntegrityError(f"expected signature algorithm {ALGORITHM!r}, got {signature['algorithm']!r}")
    expected_id = key_id(public_key)
    if signature["key_id"] != expected_id:
        raise IntegrityError(
            f"expected a signature by key {expected_id}, got one by key {str(signature['key_id'])[:40]!r}: "
            "signed with another key (or the key id was edited)"
        )
    try:
        raw = base64.b64decode(str(signature["signature"]), validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError("expected a base64 signature, got undecodable text") from None
    try:
        public_key.verify(raw, bytes(data))
    except InvalidSignature:
        raise IntegrityError(
            "expected a signature over this data, got one that does not verify (the data was changed after signing)"
        ) from None
