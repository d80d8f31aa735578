"""``harden.certify``: the robustness certificate (versioned JSON schema) and its assembly.

The verdict is EMPIRICAL (robustness measured by the attack suite, not proven) or UNRELIABLE
(a sanity check failed: the measured robustness may come from masked gradients). CERTIFIED needs
randomized smoothing at the policy's radius (not yet implemented).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from harden.checkpoint import atomic_write, weights_sha256
from harden.data import EvalData
from harden.models import prepare_model
from harden.policy import Policy, policy_hash
from harden.verify import RobustnessReport, model_device, verify

__all__ = ["CERTIFICATE_SCHEMA_VERSION", "Certificate", "certify", "environment"]

CERTIFICATE_SCHEMA_VERSION = "1.0"
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
)


def environment() -> dict[str, str]:
    """Versions of Python, harden and its main dependencies, and the platform."""
    from harden import __version__

    out = {"python": platform.python_version(), "harden": __version__, "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


class Certificate(BaseModel):
    """A robustness certificate; ``certificate.json`` is its JSON form.

    Attributes:
        schema_version: version of this schema.
        verdict: EMPIRICAL (attack suite only), CERTIFIED or UNRELIABLE.
        created: UTC time of assembly (ISO 8601).
        policy_name: the policy's name.
        policy_sha256: hash of the canonical policy (see :func:`harden.policy_hash`).
        weights_sha256: hash of the model's safetensors serialization (``model.safetensors``).
        onnx_sha256: hash of the exported ``model.onnx``, when exported.
        threat: the threat model.
        n: examples evaluated.
        clean_accuracy: clean accuracy.
        robust_accuracy: worst-case robust accuracy over the suite.
        per_attack: accuracy after each attack of the cascade.
        attacks: the attack specifications.
        seed: the policy seed.
        device: where verification ran.
        versions: package versions.
        timings: wall seconds per step (fit, verify, export).
        training: per-epoch history, when known.
        export: the ONNX parity figures, when exported.
        other_threats: accuracy under attacks outside the l_p threat model (agreement with the
            new label for label-changing invariance examples).
        other_counts: examples each ``other_threats`` entry was measured on.
        eps_curve: ``(eps, accuracy)`` pairs.
        checks: sanity-check results by id; any FAIL makes the verdict UNRELIABLE.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: str = CERTIFICATE_SCHEMA_VERSION
    verdict: Literal["EMPIRICAL", "CERTIFIED", "UNRELIABLE"]
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
    seed: int
    device: str
    versions: dict[str, str]
    timings: dict[str, float] = Field(default_factory=dict)
    training: list[dict[str, Any]] = Field(default_factory=list)
    export: dict[str, Any] | None = None
    other_threats: dict[str, float] = Field(default_factory=dict)
    other_counts: dict[str, int] = Field(default_factory=dict)
    eps_curve: list[tuple[float, float]] = Field(default_factory=list)
    checks: dict[str, dict[str, str]] = Field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``certificate.json`` into ``directory`` (atomically); returns its path."""
        path = Path(directory) / "certificate.json"
        atomic_write(path, self.model_dump_json(indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        """Read a ``certificate.json``."""
        return cls.model_validate(json.loads(Path(path).read_text()))

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of ``certificate.json``."""
        return cls.model_json_schema()


def certify(
    model: nn.Module,
    policy: Policy,
    data: EvalData | None = None,
    *,
    report: RobustnessReport | None = None,
    history: list[dict[str, Any]] | None = None,
    timings: dict[str, float] | None = None,
    progress: bool = True,
) -> Certificate:
    """Verify ``model`` (unless ``report`` is given) and assemble its certificate.

    Args:
        model: the hardened classifier.
        policy: the policy it was trained and is verified under.
        data: evaluation data (default: the policy's test split).
        report: a verification report to reuse instead of attacking again.
        history: the training history to include.
        timings: wall seconds of earlier steps to include.
        progress: show progress bars.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> cert = certify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(16), progress=False)
        >>> cert.verdict, cert.n
        ('EMPIRICAL', 16)
    """
    net = prepare_model(model, policy.model)
    if report is None:
        report = verify(net, policy, data, history=history, progress=progress)
    times = dict(timings or {})
    times.setdefault("verify", report.seconds)
    dev = model_device(net)
    return Certificate(
        verdict="EMPIRICAL" if report.reliable else "UNRELIABLE",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        policy_name=policy.name,
        policy_sha256=policy_hash(policy),
        weights_sha256=weights_sha256(net),
        threat=report.threat,
        n=report.n,
        clean_accuracy=report.clean_accuracy,
        robust_accuracy=report.robust_accuracy,
        per_attack=report.per_attack,
        broken_by=report.broken_by,
        attacks=report.attacks,
        seed=policy.seed,
        device=str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        versions=environment(),
        timings=times,
        training=list(history or []),
        other_threats=report.other_threats,
        other_counts=report.other_counts,
        eps_curve=report.eps_curve,
        checks=report.checks,
    )
