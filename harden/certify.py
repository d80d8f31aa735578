"""``harden.certify``: measure what a certificate needs beyond the attack suite, and assemble it.

:func:`measure` runs randomized smoothing and the saliency maps; :func:`assemble` builds the
:class:`~harden.certificate.Certificate` once, from every measurement (the verification report,
smoothing, the ONNX export and the ONNX session's black-box result when there is one), and
computes the verdict last. :func:`certify` is both for a model in hand (no export).
"""

from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.batches import predictions
from harden.certificate import Certificate, SaliencyExample, SmoothingSummary, environment, verdict_rule
from harden.checkpoint import weights_sha256
from harden.checks import onnx_black_box_check
from harden.data import EvalData, eval_batches, load_data, to_device
from harden.models import model_device, prepare_model
from harden.policy import Policy
from harden.policy_io import checked, policy_hash
from harden.schema import HALF_LEVEL
from harden.smoothing import smooth_certify, wilson_interval
from harden.verify import RobustnessReport, verify

__all__ = ["Certificate", "Measurements", "assemble", "certify", "measure", "saliency_map", "verdict"]


@dataclass
class Measurements:
    """What :func:`measure` found beyond the attack suite.

    Attributes:
        smoothing: randomized-smoothing results (None: ``certify.smoothing`` is off).
        saliency: saliency maps of the first test images.
        timings: wall seconds by stage (``smoothing`` when it ran).
    """

    smoothing: SmoothingSummary | None = None
    saliency: list[SaliencyExample] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
        pred = predictions(net(x))  # -1: non-finite logits (no class)
    return [
        SaliencyExample(
            label=int(y[i]),
            prediction=int(pred[i]),
            image=_round(x[i]),
            maps={k: _round(v[i]) for k, v in maps.items()},
        )
        for i in range(x.shape[0])
    ]


def _smoothing(net: nn.Module, x: torch.Tensor, y: torch.Tensor, policy: Policy, progress: bool) -> SmoothingSummary:
    spec = policy.certify
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
    return SmoothingSummary(
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


def measure(
    model: nn.Module,
    policy: Policy,
    data: EvalData,
    *,
    baseline: nn.Module | None = None,
    progress: bool = True,
) -> Measurements:
    """Randomized smoothing (``policy.certify``) and saliency maps on the first examples of ``data``.

    Seeded with ``policy.seed`` without touching the global RNG; the models are used on their own
    device and their train/eval modes are restored.

    Args:
        model: the hardened classifier (taking [0, 1] pixels).
        policy: gives ``certify`` (smoothing settings, saliency examples) and the seed.
        data: evaluation data (a DataLoader, a Dataset or an ``(x, y)`` pair).
        baseline: a plainly trained model whose saliency maps are shown beside the hardened one's.
        progress: show a progress bar.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> m = measure(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(8), progress=False)
        >>> m.smoothing is None, len(m.saliency) <= 8
        (True, True)
    """
    net = prepare_model(model, policy.model)
    base = prepare_model(baseline, policy.model) if baseline is not None else None
    dev, spec, out = model_device(net), policy.certify, Measurements()
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
                    out.saliency = _saliency(net, base, x[:k], y[:k])
                if spec.smoothing:
                    out.smoothing = _smoothing(net, x, y, policy, progress)
                    out.timings["smoothing"] = out.smoothing.seconds
    finally:
        for m, mode in zip(nets, modes, strict=True):
            restore_modes(m, mode)
    return out


def verdict(
    report: RobustnessReport, smoothing: SmoothingSummary | None, checks: dict[str, dict[str, str]]
) -> tuple[str, str]:
    """The verdict and its reason, from every measurement: :func:`harden.certificate.verdict_rule`.

    ``report`` is not consulted: the rule reads only what the certificate records (its checks
    and smoothing), so ``harden inspect`` can re-apply it.

    Args:
        report: the attack suite's report.
        smoothing: randomized-smoothing results, if run.
        checks: every sanity check by id (the suite's and, under ``harden run``, the ONNX one).

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden.verify import verify
        >>> r = verify(TinyCNN(num_classes=3), tiny_policy(verify={"checks": False}), synthetic_tensors(8), progress=False)
        >>> verdict(r, None, {})[0], verdict(r, None, {"onnx_black_box": {"status": "FAIL"}})[0]
        ('EMPIRICAL', 'UNRELIABLE')
    """
    return verdict_rule(checks, smoothing)


def _warnings(policy: Policy) -> list[str]:
    """What a reader of the certificate must see first (an eps no 8-bit image can tell apart, ...)."""
    out = []
    if policy.threat.below_half_level:
        out.append(
            f"threat eps {policy.threat.eps:g} ({policy.threat.norm}) is below half a pixel level (0.5/255 = "
            f"{HALF_LEVEL:.5f}): no 8-bit image differs from the clean one by so little, so the robust accuracy "
            "here says nothing about attacks on real images"
        )
    return out


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


def assemble(
    model: nn.Module,
    policy: Policy,
    report: RobustnessReport,
    measured: Measurements,
    *,
    history: list[dict[str, Any]] | None = None,
    timings: dict[str, float] | None = None,
    export: dict[str, Any] | None = None,
    onnx_black_box: dict[str, Any] | None = None,
) -> Certificate:
    """Build the certificate once, from every measurement; the verdict is computed last.

    Args:
        model: the certified model (its weights are hashed).
        policy: the policy it was trained and verified under.
        report: the attack suite's report.
        measured: smoothing and saliency (:func:`measure`).
        history: the training history.
        timings: wall seconds by stage (``verify`` defaults to the report's).
        export: the ONNX export's figures (:meth:`harden.export.ExportResult.to_dict`); its
            ``sha256`` becomes ``onnx_sha256``.
        onnx_black_box: the exported session attacked with gradient-free attacks; its per-example
            ``broken_by`` (key ``outcomes``) is compared with the report's: a session that falls
            where the PyTorch model held adds the ``onnx_black_box`` check (see
            :func:`harden.checks.onnx_black_box_check`).

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden.verify import verify
        >>> model, policy, data = TinyCNN(num_classes=3), tiny_policy(verify={"checks": False}), synthetic_tensors(16)
        >>> report = verify(model, policy, data, progress=False)
        >>> assemble(model, policy, report, Measurements()).verdict
        'EMPIRICAL'
    """
    net = prepare_model(model, policy.model)
    dev = model_device(net)
    times = dict(timings or {})
    times.setdefault("verify", report.seconds)
    times.update(measured.timings)
    checks = dict(report.checks)
    if onnx_black_box is not None:
        torch_broken = report.outcomes.get("broken_by", []) if report.outcomes else []
        check = onnx_black_box_check(torch_broken, onnx_black_box.get("outcomes", []))
        checks[check.id] = check.to_dict()
    decided, reason = verdict(report, measured.smoothing, checks)
    return Certificate(
        verdict=decided,
        verdict_reason=reason,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        policy_name=policy.name,
        policy_sha256=policy_hash(policy),
        weights_sha256=weights_sha256(net),
        onnx_sha256=export.get("sha256") if export else None,
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
        training=copy.deepcopy(list(history or [])),
        export=copy.deepcopy(export),  # the certificate shares nothing with the caller
        onnx_black_box=copy.deepcopy(onnx_black_box),
        other_threats=report.other_threats,
        other_counts=report.other_counts,
        eps_curve=report.eps_curve,
        checks=checks,
        warnings=_warnings(policy),
        smoothing=measured.smoothing,
        saliency=measured.saliency,
    )


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

    For a model in hand; :func:`harden.run` also exports it and attacks the ONNX session before
    assembling. Randomized smoothing (``policy.certify``) and the saliency maps run on the first
    test examples, seeded with ``policy.seed`` without touching the global RNG; the model is used
    on its own device and its train/eval modes are restored.

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
        >>> _ = torch.manual_seed(0)  # the untrained model's weights: its checks' outcomes depend on them
        >>> cert = certify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(16), progress=False)
        >>> cert.verdict, cert.n
        ('EMPIRICAL', 16)
    """
    policy = checked(policy)
    net = prepare_model(model, policy.model)
    bundle = None
    if data is None:  # loaded once: its train split serves the attacks that read it
        bundle = load_data(policy.data)
        data = bundle.test
    if report is None:
        report = verify(net, policy, data, bundle=bundle, history=history, progress=progress)
    measured = measure(net, policy, data, baseline=baseline, progress=progress)
    return assemble(net, policy, report, measured, history=history, timings=timings)
