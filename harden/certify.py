"""``harden.certify``: the robustness certificate (versioned JSON schema) and its assembly.

The verdict:

- **CERTIFIED**: randomized smoothing ran and its certified accuracy at the policy's l2 radius
  reaches ``certify.min_certified_accuracy``, and every sanity check passed. The guarantee is
  about the *smoothed* classifier (the model under Gaussian noise, majority vote).
- **EMPIRICAL**: robustness measured by the attack suite, not proven.
- **UNRELIABLE**: a sanity check failed: the measured robustness may come from masked gradients.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from harden.checkpoint import atomic_write, weights_sha256
from harden.data import EvalData, eval_batches, load_data, to_device
from harden.models import prepare_model
from harden.policy import Policy, policy_hash
from harden.smoothing import smooth_certify, wilson_interval
from harden.verify import RobustnessReport, model_device, verify

__all__ = [
    "CERTIFICATE_SCHEMA_VERSION",
    "Certificate",
    "SaliencyExample",
    "SmoothingSummary",
    "certify",
    "environment",
    "saliency_map",
]

CERTIFICATE_SCHEMA_VERSION = "2.0"
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
    from harden import __version__

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

    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid")

    label: int
    prediction: int
    image: list[list[list[float]]]
    maps: dict[str, list[list[float]]]


class Certificate(BaseModel):
    """A robustness certificate; ``certificate.json`` is its JSON form.

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
            ``providers`` that ran, ``seconds``), when ``harden run`` measured it.
    """

    model_config = ConfigDict(extra="forbid")

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
        from harden.report import to_html, to_markdown

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


def saliency_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|d CE(f(x), y) / dx|``, max over channels, each map scaled to [0, 1]: ``(N, H, W)``.

    The model's parameters get no gradient; its train/eval mode is left as it is.

    Example:
        >>> from harden.testing import TinyCNN
        >>> saliency_map(TinyCNN(num_classes=3), torch.rand(2, 1, 8, 8), torch.tensor([0, 1])).shape
        torch.Size([2, 8, 8])
    """
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    sal = grad.abs().amax(1)
    peak = sal.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (sal / peak).detach()


def _first(data: EvalData, n: int, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for xb, yb in eval_batches(data, batch_size, n):
        x, y = to_device(xb, yb, device)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _round(t: torch.Tensor) -> list[Any]:
    return torch.round(t.detach().cpu() * 1000).div(1000).tolist()


def _saliency(net: nn.Module, baseline: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> list[SaliencyExample]:
    maps = {"hardened": saliency_map(net, x, y)}
    if baseline is not None:
        maps["baseline"] = saliency_map(baseline, x, y)
    with torch.no_grad():
        pred = net(x).argmax(1)
    return [
        SaliencyExample(
            label=int(y[i]),
            prediction=int(pred[i]),
            image=_round(x[i]),
            maps={k: _round(v[i]) for k, v in maps.items()},
        )
        for i in range(x.shape[0])
    ]


def _verdict(report: RobustnessReport, smoothing: SmoothingSummary | None) -> tuple[str, str]:
    failed = [cid for cid, c in report.checks.items() if c["status"] == "FAIL"]
    if failed:
        return "UNRELIABLE", f"sanity check(s) failed: {', '.join(failed)}"
    if smoothing is None:
        return "EMPIRICAL", "attack suite only (randomized smoothing not run: certify.smoothing is false)"
    if smoothing.radius is None:
        return "EMPIRICAL", "smoothing certifies l2 radii; the threat is linf and certify.radius is not set"
    acc = smoothing.certified_accuracy or 0.0
    if acc >= smoothing.min_certified_accuracy:
        return "CERTIFIED", (
            f"smoothed classifier (sigma={smoothing.sigma:g}) certified on {acc:.1%} of {smoothing.examples} "
            f"examples at l2 radius {smoothing.radius:g} (alpha={smoothing.alpha:g})"
        )
    return "EMPIRICAL", (
        f"certified accuracy {acc:.1%} at l2 radius {smoothing.radius:g} is below the required "
        f"{smoothing.min_certified_accuracy:.0%}"
    )


def _intervals(report: RobustnessReport) -> dict[str, tuple[float, float]]:
    out = {
        "clean": wilson_interval(round(report.clean_accuracy * report.n), report.n),
        "robust": wilson_interval(round(report.robust_accuracy * report.n), report.n),
    }
    for label, acc in report.per_attack.items():
        out[label] = wilson_interval(round(acc * report.n), report.n)
    for label, acc in report.other_threats.items():
        m = report.other_counts.get(label, report.n)
        out[label] = wilson_interval(round(acc * m), m)
    return out


def certify(
    model: nn.Module,
    policy: Policy,
    data: EvalData | None = None,
    *,
    report: RobustnessReport | None = None,
    history: list[dict[str, Any]] | None = None,
    timings: dict[str, float] | None = None,
    baseline: nn.Module | None = None,
    progress: bool = True,
) -> Certificate:
    """Verify ``model`` (unless ``report`` is given), smooth it if asked, assemble its certificate.

    Randomized smoothing (``policy.certify``) and the saliency maps run on the first test
    examples, seeded with ``policy.seed`` without touching the global RNG; the model is used on
    its own device and its train/eval modes are restored.

    Args:
        model: the hardened classifier.
        policy: the policy it was trained and is verified under.
        data: evaluation data (default: the policy's test split).
        report: a verification report to reuse instead of attacking again.
        history: the training history to include.
        timings: wall seconds of earlier steps to include.
        baseline: a plainly trained model whose saliency maps are shown beside the hardened one's.
        progress: show progress bars.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> cert = certify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(16), progress=False)
        >>> cert.verdict, cert.n
        ('EMPIRICAL', 16)
    """
    from harden.attacks.base import restore_modes, save_modes

    net = prepare_model(model, policy.model)
    base = prepare_model(baseline, policy.model) if baseline is not None else None
    if data is None:
        data = load_data(policy.data).test
    if report is None:
        report = verify(net, policy, data, history=history, progress=progress)
    times = dict(timings or {})
    times.setdefault("verify", report.seconds)
    dev = model_device(net)
    spec = policy.certify
    smoothing = None
    saliency: list[SaliencyExample] = []
    nets = [m for m in (net, base) if m is not None]
    modes = [save_modes(m) for m in nets]
    try:
        for m in nets:
            m.eval()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(policy.seed)
            want = max(spec.n_examples if spec.smoothing else 0, spec.saliency_examples)
            if want:
                x, y = _first(data, want, policy.data.eval_batch_size, dev)
                if spec.saliency_examples:
                    k = spec.saliency_examples
                    saliency = _saliency(net, base, x[:k], y[:k])
                if spec.smoothing:
                    res = smooth_certify(
                        net,
                        x[: spec.n_examples],
                        y[: spec.n_examples],
                        sigma=spec.sigma,
                        n0=spec.n0,
                        n=spec.n,
                        alpha=spec.alpha,
                        batch_size=spec.batch_size,
                        radii=spec.radius_grid(),
                        progress=progress,
                    )
                    radius = spec.radius_for(policy.threat)
                    smoothing = SmoothingSummary(
                        sigma=res.sigma,
                        n0=res.n0,
                        n=res.n,
                        alpha=res.alpha,
                        examples=res.examples,
                        abstentions=res.abstentions,
                        radius=radius,
                        certified_accuracy=None if radius is None else res.accuracy_at(radius),
                        min_certified_accuracy=spec.min_certified_accuracy,
                        curve=res.curve,
                        labels=res.labels,
                        predictions=res.predictions,
                        radii=[round(r, 6) for r in res.radii],
                        seconds=res.seconds,
                        samples_per_second=res.samples_per_second,
                    )
                    times["smoothing"] = res.seconds
    finally:
        for m, mode in zip(nets, modes, strict=True):
            restore_modes(m, mode)
    verdict, reason = _verdict(report, smoothing)
    return Certificate(
        verdict=verdict,
        verdict_reason=reason,
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
        intervals=_intervals(report),
        seed=policy.seed,
        device=str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        versions=environment(),
        timings=times,
        objectives=[o.model_dump(mode="json") for o in policy.objectives],
        epochs=policy.train.epochs,
        training=list(history or []),
        other_threats=report.other_threats,
        other_counts=report.other_counts,
        eps_curve=report.eps_curve,
        checks=report.checks,
        smoothing=smoothing,
        saliency=saliency,
    )
