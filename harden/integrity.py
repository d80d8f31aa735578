"""``harden inspect``: check a certificate against the files beside it, against itself, and its signature.

:func:`inspect_certificate` returns one :class:`Check` per item; any check that is not ``ok`` means
the run folder is not what the certificate claims. The items, in order:

- **hashes** (``weights``, ``onnx``, ``policy``, ``markdown``, ``html``): the SHA-256 of
  ``model.safetensors``, ``model.onnx``, the canonical ``policy.yaml``, ``certificate.md`` and
  ``certificate.html`` recomputed and compared with the certificate (``*_sha256``, ``rendered``).
  A recorded file that is missing fails (``MISSING``), so does a file on disk the certificate does
  not vouch for (``UNRECORDED``: e.g. ``onnx_sha256: null`` beside a ``model.onnx``, or a rendering
  left by another run). A file neither recorded nor present is fine (``ABSENT``) only where the
  certificate says none was made: no ONNX file when ``export`` and ``onnx_sha256`` are both null,
  no rendering the certificate's ``rendered`` omits. The weights and the policy are always recorded.
  Only regular files are read (a link to one is followed): a FIFO, device or folder in a file's
  place fails (``UNREADABLE``), and nothing blocks on it.
- **consistency** (``schema``, ``verdict``, ``accuracy``, ``intervals``, ``broken_by``,
  ``checks``, ``smoothing``, ``export``): the certificate agrees with itself: the verdict rule
  (:func:`harden.certificate.verdict_rule`) re-applied gives its verdict and reason; accuracies,
  Wilson intervals, counts and the smoothing summary fit together.
- **ONNX metadata** (``onnx_metadata``): ``model.onnx``'s ``metadata_props`` equal what the
  export stamped (``export.metadata``) and name the certificate's policy hash, threat and
  accuracies (a FIFO, device or folder there fails); its verdict, stamped before the ONNX session was attacked, is the final one unless
  the ``onnx_black_box`` check turned it UNRELIABLE.
- **signature** (``signature``): with a public key, the Ed25519 signature must be there and verify
  over :meth:`~harden.certificate.Certificate.canonical_bytes`. Without a key a signature is
  reported ``UNVERIFIED``: present, *not* checked (``ok``, but it proves nothing).
- **requirements** (``requirement``, one per target): each target the certificate records
  (``certify.require``) and each one passed as ``require=`` (``harden inspect --require``),
  evaluated against the certificate's own numbers (never its recorded ``passed``): ``OK`` when
  met, ``FAIL`` when not or when the certificate did not measure the metric. This is the CI/CD
  gate: ``harden inspect --require "robust_accuracy >= 0.45"`` exits 1 on a model below it.

Without a verified signature these checks catch accidents and clumsy edits only: whoever can write
the folder can also rewrite every hash in an unsigned certificate.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harden.certificate import Certificate, verdict_rule
from harden.consistency import consistency_problems
from harden.errors import HardenError, IntegrityError
from harden.policy_io import load_policy, policy_hash
from harden.require import Requirement, format_fraction, parse_requirement
from harden.signing import key_id, load_public_key, verify_signature

__all__ = ["OK_STATUSES", "Check", "HashCheck", "inspect_certificate"]

#: The statuses of a check that passes; any other (``MISMATCH``, ``MISSING``, ``UNRECORDED``,
#: ``UNREADABLE``, ``FAIL``, ``INVALID``) fails.
OK_STATUSES = frozenset({"OK", "ABSENT", "UNSIGNED", "UNVERIFIED"})
_MAX_ONNX_BYTES = 2**31  # protobuf's limit: a larger model.onnx cannot be a loadable file
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open


def _open_regular(path: Path) -> int:
    """An fd open on ``path`` for reading: OSError unless it is a regular file (never blocks on a FIFO).

    Links are followed (a link to a regular file is fine); a FIFO, device or folder is refused.
    """
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return fd


def _sha256_regular(path: Path) -> str:
    """SHA-256 of a regular file, streamed in 1 MiB chunks (see :func:`_open_regular`)."""
    h = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Check:
    """One item of ``harden inspect``.

    Attributes:
        item: what is checked (``weights``, ``onnx``, ``policy``, ``markdown``, ``html``,
            ``schema``, ``verdict``, ``accuracy``, ``intervals``, ``broken_by``, ``checks``,
            ``smoothing``, ``export``, ``requirements``, ``baseline``, ``onnx_metadata``,
            ``signature``, ``requirement``).
        status: ``OK``, ``ABSENT``, ``UNSIGNED``, ``UNVERIFIED`` (these pass) or ``MISMATCH``,
            ``MISSING``, ``UNRECORDED``, ``UNREADABLE``, ``FAIL``, ``INVALID``.
        detail: why, for people (one line).
        path: the file concerned (``certificate.json`` for the consistency and signature checks;
            always set by :func:`inspect_certificate`).
        expected: the certificate's hash (hash checks) or the trusted key's id (signature).
        actual: the recomputed hash, or the key id the signature names.
    """

    item: str
    status: str
    detail: str
    path: Path | None = None
    expected: str | None = None
    actual: str | None = None

    @property
    def ok(self) -> bool:
        """True when the status is one of :data:`OK_STATUSES`."""
        return self.status in OK_STATUSES


HashCheck = Check  # the name before checks went beyond hashes


def _hash(item: str, path: Path, expected: str | None, absent_ok: str, compute: Callable[[Path], str]) -> Check:
    """A hash check; ``absent_ok`` (non-empty): the certificate says the file was never made."""
    if not path.exists() and not path.is_symlink():
        if expected is not None:
            return Check(item, "MISSING", f"{path.name} not found", path, expected)
        if absent_ok:
            return Check(item, "ABSENT", absent_ok, path)
        return Check(item, "UNRECORDED", "the certificate records no hash for it", path)
    try:
        actual = compute(path)
    except IntegrityError as exc:  # read, but no longer what was hashed (a policy that does not load)
        return Check(item, "MISMATCH", str(exc), path, expected)
    except OSError as exc:
        return Check(item, "UNREADABLE", f"{path.name} cannot be read: {exc.strerror or exc}", path, expected)
    if expected is None:
        what = "stale (left by another run) or planted" if absent_ok else "the certificate records no hash for it"
        msg = f"{path.name} is here but the certificate does not vouch for it: {what}"
        return Check(item, "UNRECORDED", msg, path, None, actual)
    if actual != expected:
        return Check(item, "MISMATCH", f"{path.name} differs from the certified file", path, expected, actual)
    return Check(item, "OK", "matches", path, expected, actual)


def _policy_digest(path: Path) -> str:
    if not path.is_file():
        raise OSError(f"{path.name} is not a regular file")  # load_policy would name it a bad policy
    # hashing builds no code: a policy naming user code is hashed like any other
    try:
        return policy_hash(load_policy(path, allow_code=True))
    except HardenError as exc:  # a policy edited into invalidity is tampering too
        raise IntegrityError(f"policy.yaml no longer loads: {exc}") from None


def _hash_checks(cert: Certificate, root: Path) -> list[Check]:
    no_onnx = (
        "not exported (export and onnx_sha256 are null)" if cert.export is None and cert.onnx_sha256 is None else ""
    )
    out = [
        _hash("weights", root / "model.safetensors", cert.weights_sha256, "", _sha256_regular),
        _hash("onnx", root / "model.onnx", cert.onnx_sha256, no_onnx, _sha256_regular),
        _hash("policy", root / "policy.yaml", cert.policy_sha256, "", _policy_digest),
    ]
    for item, name in (("markdown", "certificate.md"), ("html", "certificate.html")):
        recorded = cert.rendered.get(name)  # type: ignore[call-overload]
        out.append(
            _hash(item, root / name, recorded, "not rendered (the certificate records no hash)", _sha256_regular)
        )
    return out


def _consistency_checks(cert: Certificate, path: Path) -> list[Check]:
    return [
        Check(item, "FAIL", "; ".join(problems)[:1000], path) if problems else Check(item, "OK", "consistent", path)
        for item, problems in consistency_problems(cert)
    ]


def _read_metadata(path: Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file; :class:`IntegrityError` for anything but a loadable model."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IntegrityError(f"not readable as a regular file ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        if os.fstat(fd).st_size >= _MAX_ONNX_BYTES:
            raise IntegrityError("over 2 GiB: not a loadable ONNX file")
        data = fh.read(_MAX_ONNX_BYTES)
    try:
        import onnx

        proto = onnx.load_model_from_string(data)
        pairs = [(str(p.key), str(p.value)) for p in proto.metadata_props]
    except Exception as exc:  # garbage in: any parser error is a failed check
        raise IntegrityError(f"not a readable ONNX model ({type(exc).__name__})") from None
    meta = dict(pairs)
    if len(meta) != len(pairs):
        raise IntegrityError("metadata_props repeats a key")
    return meta


def _onnx_metadata_check(cert: Certificate, path: Path) -> Check:
    if cert.onnx_sha256 is None and not path.exists():
        return Check("onnx_metadata", "ABSENT", "not exported", path)
    try:
        meta = _read_metadata(path)
    except OSError as exc:
        return Check("onnx_metadata", "MISSING", f"{path.name} cannot be read: {exc.strerror or exc}", path)
    except IntegrityError as exc:
        return Check("onnx_metadata", "FAIL", f"{path.name}: {exc}", path)
    out = []
    stamped = cert.export.get("metadata") if cert.export else None
    if stamped is not None and not isinstance(stamped, dict):
        out.append("export.metadata is not a mapping")
    elif stamped is not None and meta != stamped:
        keys = sorted(k for k in set(meta) | set(stamped) if meta.get(k) != stamped.get(k))
        out.append(f"differs from the metadata stamped at export in {', '.join(keys)[:300]}")
    want = {
        "policy_hash": cert.policy_sha256,
        "clean_accuracy": f"{cert.clean_accuracy:.6f}",
        "robust_accuracy": f"{cert.robust_accuracy:.6f}",
    }
    out += [f"{k} is {meta.get(k)!r}, the certificate's {v!r}" for k, v in want.items() if meta.get(k) != v]
    try:
        threat = json.loads(meta.get("threat_model", "null"))
    except (ValueError, RecursionError):
        threat = None
    if threat != cert.threat:
        out.append(f"threat_model is {meta.get('threat_model')!r}, the certificate's {cert.threat!r}")
    stamped_verdict, final = meta.get("certificate_verdict"), cert.verdict
    before = verdict_rule({k: v for k, v in cert.checks.items() if k != "onnx_black_box"}, cert.smoothing)[0]
    obb_failed = cert.checks.get("onnx_black_box", {}).get("status") == "FAIL"
    if stamped_verdict != final and not (final == "UNRELIABLE" and obb_failed and stamped_verdict == before):
        out.append(
            f"certificate_verdict is {stamped_verdict!r}, the certificate's {final} (before the ONNX attacks: {before})"
        )
    if out:
        return Check("onnx_metadata", "FAIL", "; ".join(out)[:1000], path)
    return Check("onnx_metadata", "OK", "matches the certificate", path)


def _signature_check(cert: Certificate, path: Path, public_key: Any) -> Check:
    sig = cert.signature
    named = str(sig.get("key_id")) if sig else None
    if public_key is None:
        if sig is None:
            return Check("signature", "UNSIGNED", "no signature (nothing vouches for who wrote this certificate)", path)
        return Check(
            "signature",
            "UNVERIFIED",
            f"signature by key {named} present but NOT verified: no public key given",
            path,
            None,
            named,
        )
    trusted = key_id(public_key)
    if sig is None:
        return Check(
            "signature", "MISSING", f"expected a signature by key {trusted}, got an unsigned certificate", path, trusted
        )
    try:
        verify_signature(public_key, cert.canonical_bytes(), sig)
    except IntegrityError as exc:
        return Check("signature", "INVALID", str(exc), path, trusted, named)
    return Check("signature", "OK", f"verified: signed by key {trusted}", path, trusted, named)


#: targets that no failed attack sanity check can inflate (an UNRELIABLE verdict fails the others)
_NOT_ATTACKED = frozenset({"clean_accuracy", "certified_accuracy"})


def _requirement_checks(cert: Certificate, extra: list[Requirement], path: Path) -> list[Check]:
    """One check per target (the certificate's own, then ``extra``), recomputed from the numbers.

    A robust target met by an UNRELIABLE certificate fails: a failed sanity check means the
    attacks may have missed, so the robust figures may overstate the model.
    """
    values = cert.measured_values()
    out, seen = [], set()
    for req in [parse_requirement(r.text) for r in cert.requirements] + extra:
        if req.text in seen:
            continue
        seen.add(req.text)
        actual = req.actual(values)
        measured = "not measured by this certificate" if actual is None else f"measured {format_fraction(actual)}"
        status = "OK" if req.check(values) else "FAIL"
        if status == "OK" and cert.verdict == "UNRELIABLE" and req.metric not in _NOT_ATTACKED:
            status, measured = "FAIL", f"{measured}, but the evaluation is UNRELIABLE: {cert.verdict_reason}"
        detail = f"{req.text}: {'PASS' if status == 'OK' else 'FAIL'} ({measured})"
        out.append(Check("requirement", status, detail, path, req.text, None if actual is None else repr(actual)))
    return out


def inspect_certificate(
    path: str | Path, *, public_key: Any = None, require: Iterable[str] = ()
) -> tuple[Certificate, list[Check]]:
    """Load ``certificate.json`` and check it against the files beside it, itself, ``public_key`` and ``require``.

    Args:
        path: a ``certificate.json``, or the directory holding it.
        public_key: an Ed25519 public key, or the path of its PEM file: the signature must then
            verify (None: a signature is reported ``UNVERIFIED``).
        require: targets (``METRIC OP VALUE``, :func:`harden.require.parse_requirement`) the
            certificate must meet, besides the ones it records: each is a ``requirement`` check.

    Returns:
        The certificate and the checks, in the order of the module docs; the run folder is sound
        when every ``check.ok``.

    Raises:
        IntegrityError: the certificate is missing, unreadable or not a valid certificate, or the
            public key file cannot be read (one line naming the file).
        PolicyError: a ``require`` entry is not a requirement (checked before anything is read).

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden import certify
        >>> d = tempfile.mkdtemp()
        >>> _ = certify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(8), progress=False).save(d)
        >>> [(c.item, c.status) for c in inspect_certificate(d)[1] if not c.ok]  # no model files beside it
        [('weights', 'MISSING'), ('policy', 'MISSING')]
        >>> checks = inspect_certificate(d, require=["clean_accuracy >= 0", "robust_accuracy > 100%"])[1]
        >>> [(c.expected, c.status) for c in checks if c.item == "requirement"]
        [('clean_accuracy >= 0%', 'OK'), ('robust_accuracy > 100%', 'FAIL')]
    """
    extra = [parse_requirement(text) for text in ([require] if isinstance(require, str) else require)]
    p = Path(path)
    if p.is_dir():
        p = p / "certificate.json"
    if isinstance(public_key, (str, Path)):
        public_key = load_public_key(public_key)
    cert = Certificate.load(p)
    checks = _hash_checks(cert, p.parent)
    checks += _consistency_checks(cert, p)
    checks.append(_onnx_metadata_check(cert, p.parent / "model.onnx"))
    checks.append(_signature_check(cert, p, public_key))
    try:
        checks += _requirement_checks(cert, extra, p)
    except HardenError as exc:  # a recorded text that no longer parses: already a consistency FAIL
        checks.append(Check("requirement", "FAIL", f"a recorded requirement does not parse: {exc}", p))
    return cert, checks
