"""``harden.certificate``: the robustness certificate's schema (``certificate.json``, versioned).

The verdict:

- **CERTIFIED**: randomized smoothing ran and its certified accuracy at the policy's l2 radius
  reaches ``certify.min_certified_accuracy``, and every sanity check passed. The guarantee is
  about the *smoothed* classifier (the model under Gaussian noise, majority vote).
- **EMPIRICAL**: robustness measured by the attack suite, not proven.
- **UNRELIABLE**: a sanity check failed: the measured robustness may come from masked gradients
  (or, under ``harden run``, the exported ONNX session fell to black-box attacks the PyTorch
  model's white-box suite did not find).

The rule is :func:`verdict_rule`, a pure function of the certificate's own ``checks`` and
``smoothing``, so ``harden inspect`` re-applies it to a certificate it reads.

A certificate is assembled once (:func:`harden.certify.assemble`), with every measurement in
hand, and is frozen: nothing edits it afterwards. It is data only; :mod:`harden.report` renders
it as Markdown and HTML, and :meth:`Certificate.load` reads it back through
:mod:`harden.certificate_io` (capped, strict, one-line errors). :meth:`Certificate.save` writes
the renderings first and ``certificate.json`` last, holding their hashes (``rendered``) and,
given a key, an Ed25519 signature over :meth:`Certificate.canonical_bytes` (``signature``):
``certificate.json`` is the commit marker of a run folder, and everything it vouches for is on
disk before it appears.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from harden._version import __version__
from harden.certificate_io import MAX_CERTIFICATE_BYTES, load_strict
from harden.certificate_parts import (
    BaselineSummary,
    ClassResult,
    RequirementResult,
    SaliencyExample,
    Sha256,
    SmoothingSummary,
    requirement_results,
    requirement_values,
    verdict_rule,
)
from harden.checkpoint import atomic_write
from harden.report import to_html, to_markdown
from harden.signing import load_private_key, sign

__all__ = [
    "CERTIFICATE_SCHEMA_VERSION",
    "MAX_CERTIFICATE_BYTES",
    "SUPPORTED_SCHEMA_VERSIONS",
    "VERIFY_TIME_PARTS",
    "BaselineSummary",
    "Certificate",
    "ClassResult",
    "RequirementResult",
    "SaliencyExample",
    "SmoothingSummary",
    "environment",
    "fields_after",
    "requirement_results",
    "requirement_values",
    "verdict_rule",
]

# 2.1: onnx_black_box.outcomes and the onnx_black_box check
# 2.2: rendered (SHA-256 of certificate.md / .html), warnings, signature (Ed25519 over canonical_bytes);
#      certificate.json is written last
# 2.3: requirements (certify.require and their results), baseline (the undefended model's figures), per_class,
#      sample, check_n / check_clean_accuracy, eps_intervals; a check may be SKIP. A 2.2 file still loads (the new
#      fields take their empty defaults) and its signature still verifies (canonical_bytes leaves them out).
# 2.4: verify_seconds (where verify's time went: attacks, other attacks, set-up, checks, eps sweep, rest) and
#      per_check_seconds (each sanity check's cost); 2.2 and 2.3 files load and verify as before.
CERTIFICATE_SCHEMA_VERSION = "2.4"
#: the versions ``Certificate.load`` and ``harden inspect`` accept
SUPPORTED_SCHEMA_VERSIONS = ("2.2", "2.3", "2.4")
#: the fields 2.3 added: a 2.2 certificate has none of them (they are left out of its canonical bytes)
FIELDS_SINCE_2_3 = (
    "requirements",
    "baseline",
    "per_class",
    "sample",
    "check_n",
    "check_clean_accuracy",
    "eps_intervals",
)
#: the fields 2.4 added (left out of the canonical bytes of a 2.2 or 2.3 certificate)
FIELDS_SINCE_2_4 = ("verify_seconds", "per_check_seconds")
#: a part of ``verify_seconds`` (:meth:`harden.robustness.RobustnessReport.time_split`)
VerifyPart = Literal["attacks", "other_attacks", "setup", "checks", "eps_sweep", "rest"]
#: the parts of ``verify_seconds``, in order
VERIFY_TIME_PARTS: tuple[str, ...] = get_args(VerifyPart)
RENDERINGS = {"md": "certificate.md", "html": "certificate.html"}
_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "pot",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "onnxscript",
    "numpy",
    "pydantic",
    "scipy",
)


def fields_after(version: str) -> tuple[str, ...]:
    """The fields later schema versions added: a certificate of ``version`` has none of them.

    Example:
        >>> fields_after("2.3"), fields_after(CERTIFICATE_SCHEMA_VERSION)
        (('verify_seconds', 'per_check_seconds'), ())
    """
    later = {"2.2": FIELDS_SINCE_2_3 + FIELDS_SINCE_2_4, "2.3": FIELDS_SINCE_2_4}
    return later.get(version, ())


def environment() -> dict[str, str]:
    """Versions of Python, harden and its main dependencies, and the platform."""
    out = {"python": platform.python_version(), "harden": __version__, "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


class Certificate(BaseModel):
    """A robustness certificate; ``certificate.json`` is its JSON form. Frozen once assembled.

    Attributes:
        schema_version: version of this schema (``harden schema --certificate`` prints it).
        verdict: CERTIFIED, EMPIRICAL or UNRELIABLE (see the module docs); verdict_reason says why.
        created: UTC time of assembly (ISO 8601).
        policy_name: the policy's name; policy_sha256: hash of the canonical policy.
        weights_sha256: hash of ``model.safetensors``; onnx_sha256: of ``model.onnx`` when exported.
        threat: the threat model.
        n: examples attacked; clean_accuracy, robust_accuracy: clean and worst-case accuracy.
        per_attack: accuracy after each attack of the cascade; broken_by: examples each attack
            was the first to fool; attacks: the attack specifications.
        intervals: 95% Wilson interval of every accuracy above (keys ``clean``, ``robust``,
            the per-attack and other-threat labels).
        other_threats / other_counts: attacks outside the l_p threat model and their sample counts.
        eps_curve: ``(eps, accuracy)`` pairs; checks: sanity checks by id.
        smoothing: randomized-smoothing results, when run.
        objectives: the training objectives with weights and parameters; epochs: planned epochs.
        training: per-epoch history (loss and accuracy curves).
        saliency: saliency maps of a few test images.
        seed, device, versions, timings: reproducibility facts.
        export: the ONNX parity figures, when exported.
        onnx_black_box: the exported ONNX session attacked itself with the gradient-free attacks
            (``n``, ``clean_accuracy``, ``robust_accuracy``, ``per_attack``, ``intervals``, the
            ``providers`` that ran, ``seconds``, and per example ``outcomes``: ``""`` held, else
            the attack that fooled it), when ``harden run`` measured it; the ``onnx_black_box``
            check compares those outcomes with the PyTorch suite's.
        rendered: SHA-256 of ``certificate.md`` and ``certificate.html`` as written beside it
            (keys are the file names; filled by :meth:`save`).
        warnings: notes a reader must see (rendered at the top of the Markdown and HTML).
        requirements: the targets of ``certify.require`` and their results (shown at the top;
            ``harden inspect`` recomputes them from the numbers and fails when one is not met).
        baseline: the undefended baseline's figures, when ``certify(..., baseline=)`` verified one.
        per_class: clean and robust counts per class on the verified examples.
        sample: how the ``n`` examples were drawn from the test split (``balanced`` or ``first``).
        check_n, check_clean_accuracy: the check subset (the sanity checks and the eps curve ran
            on it; the curve's eps 0 point is its clean accuracy) and its clean accuracy.
        eps_intervals: the 95% Wilson interval of each eps-curve point (out of ``check_n``).
        verify_seconds: where the verification's wall time went, by part (:data:`VERIFY_TIME_PARTS`:
            the l_p attacks, the other attacks, set-up, the sanity checks, the eps sweep, the rest).
        per_check_seconds: each sanity check's wall time by id (the attacks it ran included).
        signature: ``{"algorithm": "ed25519", "key_id", "signature"}`` over :meth:`canonical_bytes`
            (None: unsigned); see :mod:`harden.signing`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: str = CERTIFICATE_SCHEMA_VERSION
    verdict: Literal["EMPIRICAL", "CERTIFIED", "UNRELIABLE"]
    verdict_reason: str = ""
    created: str
    policy_name: str
    policy_sha256: str
    weights_sha256: str
    onnx_sha256: str | None = None
    threat: dict[str, Any]
    n: int = Field(ge=1)
    clean_accuracy: float = Field(ge=0, le=1)
    robust_accuracy: float = Field(ge=0, le=1)
    per_attack: dict[str, float]
    broken_by: dict[str, int] = Field(default_factory=dict)
    attacks: list[dict[str, Any]]
    intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    seed: int
    device: str
    versions: dict[str, str]
    timings: dict[str, float] = Field(default_factory=dict)
    objectives: list[dict[str, Any]] = Field(default_factory=list)
    epochs: int | None = None
    training: list[dict[str, Any]] = Field(default_factory=list)
    export: dict[str, Any] | None = None
    onnx_black_box: dict[str, Any] | None = None
    other_threats: dict[str, float] = Field(default_factory=dict)
    other_counts: dict[str, int] = Field(default_factory=dict)
    eps_curve: list[tuple[float, float]] = Field(default_factory=list)
    checks: dict[str, dict[str, str]] = Field(default_factory=dict)
    smoothing: SmoothingSummary | None = None
    saliency: list[SaliencyExample] = Field(default_factory=list)
    rendered: dict[Literal["certificate.md", "certificate.html"], Sha256] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    signature: dict[str, str] | None = None
    requirements: list[RequirementResult] = Field(default_factory=list)
    baseline: BaselineSummary | None = None
    per_class: list[ClassResult] = Field(default_factory=list)
    sample: str | None = None
    check_n: int | None = Field(None, ge=1)
    check_clean_accuracy: float | None = Field(None, ge=0, le=1)
    eps_intervals: list[tuple[float, float]] = Field(default_factory=list)
    verify_seconds: dict[VerifyPart, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    per_check_seconds: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)

    def measured_values(self) -> dict[str, float | None]:
        """What a requirement may name: :func:`requirement_values` of this certificate."""
        return requirement_values(self.clean_accuracy, self.robust_accuracy, self.per_attack, self.smoothing)

    def canonical_bytes(self) -> bytes:
        """The signed form: this certificate's JSON without ``signature``, keys sorted, compact, UTF-8.

        It is computed from the JSON the certificate serializes to (tuples become lists, floats
        their shortest repr), so a certificate loaded from ``certificate.json`` gives the very bytes
        that were signed. An older certificate's bytes leave out the fields later versions added
        (:func:`fields_after`), so its signature still verifies.

        Example:
            >>> cert = Certificate(verdict="EMPIRICAL", created="2025-01-01T00:00:00+00:00", policy_name="p",
            ...     policy_sha256="0" * 64, weights_sha256="1" * 64, threat={"eps": 0.1}, n=4, clean_accuracy=0.75,
            ...     robust_accuracy=0.5, per_attack={}, attacks=[], seed=0, device="cpu", versions={})
            >>> cert.canonical_bytes()[:40]
            b'{"attacks":[],"baseline":null,"broken_by'
        """
        skip = {"signature", *fields_after(self.schema_version)}
        doc = json.loads(self.model_dump_json(exclude=skip))
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def save(
        self,
        directory: str | Path,
        formats: tuple[str, ...] = ("json", "md", "html"),
        *,
        signing_key: Any = None,
    ) -> Path:
        """Write ``certificate.md`` / ``.html`` (as asked), then ``certificate.json`` last, into ``directory``.

        An existing ``certificate.json`` there is deleted first, and the renderings not asked for
        too, so a crash midway leaves no certificate rather than a stale one. Each file is written
        atomically. The JSON written records the renderings' SHA-256 (``rendered``) and, with
        ``signing_key``, the signature over :meth:`canonical_bytes`; load it back with :meth:`load`
        (this object, assembled before the files existed, has neither).

        Args:
            directory: the run folder (created if missing).
            formats: ``md`` and / or ``html`` renderings to write (``certificate.json`` always is).
            signing_key: an Ed25519 private key, or the path of its PEM file (None: unsigned).

        Returns:
            The path of ``certificate.json``.

        Raises:
            IntegrityError: the signing key cannot be read.
            CheckpointError: a file cannot be written (e.g. a full disk).
        """
        directory = Path(directory)
        path = directory / "certificate.json"
        if isinstance(signing_key, (str, Path)):
            signing_key = load_private_key(signing_key)
        directory.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        base = self.model_copy(update={"rendered": {}, "signature": None})
        rendered: dict[str, str] = {}
        for fmt, name in RENDERINGS.items():
            if fmt not in formats:
                (directory / name).unlink(missing_ok=True)
                continue
            data = (to_markdown(base) if fmt == "md" else to_html(base)).encode()
            atomic_write(directory / name, data)
            rendered[name] = hashlib.sha256(data).hexdigest()
        final = Certificate.model_validate({**self.model_dump(), "rendered": rendered, "signature": None})
        if signing_key is not None:
            final = Certificate.model_validate(
                {**final.model_dump(), "signature": sign(signing_key, final.canonical_bytes())}
            )
        atomic_write(path, final.model_dump_json(indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        """Read a ``certificate.json`` (or the one in the directory ``path``), treating it as hostile.

        Raises:
            IntegrityError: one line naming the file: missing or unreadable, over
                :data:`MAX_CERTIFICATE_BYTES`, not a regular file (a FIFO or device: refused without
                blocking), not JSON (or NaN / duplicate keys), nested too deeply, or not a valid
                certificate. Validation is strict: nothing is coerced (``"n": "96"`` or ``96.0`` is
                refused, not read as 96), while JSON arrays fill the tuple fields.

        Example:
            >>> import tempfile
            >>> Certificate.load(tempfile.mkdtemp())
            Traceback (most recent call last):
            ...
            harden.errors.IntegrityError: .../certificate.json: expected a readable certificate, got No such file or directory
        """
        p = Path(path)
        if p.is_dir():
            p = p / "certificate.json"
        # what inspect verifies must exist (no lone surrogates, no NaN): canonical_bytes is checked too
        return load_strict(p, cls, check=lambda cert: cert.canonical_bytes())

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of ``certificate.json``."""
        return cls.model_json_schema()
