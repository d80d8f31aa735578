"""``harden.certificate``: the robustness certificate's schema (``certificate.json``, versioned).

The verdict:

- **CERTIFIED**: randomized smoothing ran and its certified accuracy at the policy's l2 radius
  reaches ``certify.min_certified_accuracy``, and every sanity check passed. The guarantee is
  about the *smoothed* classifier (the model under Gaussian noise, majority vote).
- **EMPIRICAL**: robustness measured by the attack suite, not proven.
- **UNRELIABLE**: a sanity check failed: the measured robustness may come from masked gradients
  (or, under ``harden run``, the exported ONNX session fell to black-box attacks the PyTorch
  model's white-box suite did not find).

A certificate is assembled once (:func:`harden.certify.assemble`), with every measurement in
hand, and is frozen: nothing edits it afterwards. It is data only; :mod:`harden.report` renders
it as Markdown and HTML.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harden._version import __version__
from harden.checkpoint import atomic_write
from harden.report import to_html, to_markdown

__all__ = ["CERTIFICATE_SCHEMA_VERSION", "Certificate", "SaliencyExample", "SmoothingSummary", "environment"]

CERTIFICATE_SCHEMA_VERSION = "2.1"  # 2.1: onnx_black_box.outcomes and the onnx_black_box check
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


def environment() -> dict[str, str]:
    """Versions of Python, harden and its main dependencies, and the platform."""
    out = {"python": platform.python_version(), "harden": __version__, "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


class SmoothingSummary(BaseModel):
    """Randomized-smoothing results (Cohen et al. 2019) as stored in the certificate.

    Attributes:
        sigma, n0, n, alpha: CERTIFY's settings.
        examples: examples certified; abstentions: how many the smoothed classifier abstained on.
        radius: the l2 radius the verdict is about (None with an linf threat and no radius set).
        certified_accuracy: certified accuracy at ``radius``.
        min_certified_accuracy: what CERTIFIED requires at ``radius``.
        curve: ``(radius, certified accuracy)`` pairs.
        labels, predictions, radii: per example (prediction -1 = abstain).
        seconds: wall time; samples_per_second: noisy forward passes per second.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma: float
    n0: int
    n: int
    alpha: float
    examples: int
    abstentions: int
    radius: float | None
    certified_accuracy: float | None
    min_certified_accuracy: float
    curve: list[tuple[float, float]]
    labels: list[int]
    predictions: list[int]
    radii: list[float]
    seconds: float
    samples_per_second: float


class SaliencyExample(BaseModel):
    """One test image and its input-gradient saliency maps.

    Maps are ``|d CE / dx|``, max over channels, scaled to [0, 1], for the hardened model and,
    when given, a plainly trained baseline.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: int
    prediction: int
    image: list[list[list[float]]]
    maps: dict[str, list[list[float]]]


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

    def save(self, directory: str | Path, formats: tuple[str, ...] = ("json", "md", "html")) -> Path:
        """Write ``certificate.json`` (and ``.md`` / ``.html``) into ``directory`` atomically.

        Returns:
            The path of ``certificate.json``.
        """
        directory = Path(directory)
        path = directory / "certificate.json"
        atomic_write(path, self.model_dump_json(indent=2).encode())
        if "md" in formats:
            atomic_write(directory / "certificate.md", to_markdown(self).encode())
        if "html" in formats:
            atomic_write(directory / "certificate.html", to_html(self).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        """Read a ``certificate.json``."""
        return cls.model_validate(json.loads(Path(path).read_text()))

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of ``certificate.json``."""
        return cls.model_json_schema()
