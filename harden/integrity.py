"""``harden inspect``: re-hash the files a certificate vouches for.

A certificate records the SHA-256 of the weights (``model.safetensors``), of the exported
``model.onnx`` and of the canonical policy. :func:`inspect_certificate` recomputes them from the
files beside ``certificate.json`` and says which do not match: a swapped or tampered model,
ONNX file or policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harden.certificate import Certificate
from harden.checkpoint import sha256_file
from harden.errors import HardenError
from harden.policy_io import load_policy, policy_hash

__all__ = ["HashCheck", "inspect_certificate"]


@dataclass(frozen=True)
class HashCheck:
    """One file's integrity check.

    Attributes:
        item: ``weights``, ``onnx`` or ``policy``.
        path: the file re-hashed.
        expected: the hash in the certificate (None: the certificate records none).
        actual: the recomputed hash (None: the file is missing or unreadable).
        status: ``OK``, ``MISMATCH``, ``MISSING`` (file absent) or ``UNRECORDED``.
        detail: why, for people.
    """

    item: str
    path: Path
    expected: str | None
    actual: str | None
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        """True unless the file is missing or differs from what the certificate records."""
        return self.status in ("OK", "UNRECORDED")


def _check(item: str, path: Path, expected: str | None, compute: str | None, error: str = "") -> HashCheck:
    if expected is None:
        return HashCheck(item, path, None, compute, "UNRECORDED", "the certificate records no hash for it")
    if compute is None and error:
        return HashCheck(item, path, expected, None, "MISMATCH", error)
    if compute is None:
        return HashCheck(item, path, expected, None, "MISSING", f"{path.name} not found")
    if compute != expected:
        return HashCheck(item, path, expected, compute, "MISMATCH", f"{path.name} differs from the certified file")
    return HashCheck(item, path, expected, compute, "OK", "matches")


def inspect_certificate(path: str | Path) -> tuple[Certificate, list[HashCheck]]:
    """Load ``certificate.json`` and re-hash the model, ONNX and policy files beside it.

    The files are ``model.safetensors``, ``model.onnx`` and ``policy.yaml``.

    Args:
        path: a ``certificate.json``, or the directory holding it.

    Returns:
        The certificate and one :class:`HashCheck` per item.

    Raises:
        HardenError: the certificate is missing or not a valid certificate.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden import certify
        >>> d = tempfile.mkdtemp()
        >>> _ = certify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(8), progress=False).save(d)
        >>> [c.status for c in inspect_certificate(d)[1]]   # no model files written beside it
        ['MISSING', 'UNRECORDED', 'MISSING']
    """
    p = Path(path)
    if p.is_dir():
        p = p / "certificate.json"
    if not p.is_file():
        raise HardenError(f"expected a certificate.json, got no file at {p}")
    try:
        cert = Certificate.load(p)
    except (ValueError, OSError) as exc:
        raise HardenError(f"expected a valid certificate in {p}, got: {exc}") from exc
    root = p.parent
    weights = root / "model.safetensors"
    onnx_path = root / "model.onnx"
    policy_path = root / "policy.yaml"
    checks = [
        _check("weights", weights, cert.weights_sha256, sha256_file(weights) if weights.is_file() else None),
        _check("onnx", onnx_path, cert.onnx_sha256, sha256_file(onnx_path) if onnx_path.is_file() else None),
    ]
    policy_digest, error = None, ""
    if policy_path.is_file():
        try:
            policy_digest = policy_hash(load_policy(policy_path))
        except HardenError as exc:  # a policy edited into invalidity is tampering too
            error = f"policy.yaml no longer loads: {exc}"
            policy_digest = None
    checks.append(_check("policy", policy_path, cert.policy_sha256, policy_digest, error))
    return cert, checks
