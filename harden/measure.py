"""``harden.measure``: what a certificate needs measured beyond the attack suite.

:func:`measure` runs randomized smoothing (``policy.certify``) and draws the input-gradient
saliency maps (:func:`saliency_map`) on the first test examples, seeded with ``policy.seed``
without touching the global RNG; :func:`verify_baseline` verifies an undefended baseline the way
the model is verified (same suite, eps sweep, examples and seed; sanity checks off). Their
results are what :func:`harden.certify.assemble` puts in the certificate; :mod:`harden.certify`
re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.batches import predictions
from harden.certificate import SaliencyExample, SmoothingSummary
from harden.data import DataBundle, EvalData, eval_batches, to_device
from harden.models import model_device, prepare_model
from harden.policy import Policy
from harden.smoothing import smooth_certify
from harden.verify import RobustnessReport, verify

__all__ = ["Measurements", "measure", "saliency_map", "verify_baseline"]


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


def verify_baseline(
    baseline: nn.Module,
    policy: Policy,
    data: EvalData | None = None,
    *,
    bundle: DataBundle | None = None,
    progress: bool = True,
) -> RobustnessReport:
    """Verify an undefended baseline as the model is: same suite, eps sweep, examples and seed; checks off.

    Hand the report to :func:`harden.certify.assemble` (``baseline_report=``); :func:`harden.certify.certify`
    does it for you.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> r = verify_baseline(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(8), progress=False)
        >>> r.n, r.checks
        (8, {})
    """
    quick = policy.model_copy(update={"verify": policy.verify.model_copy(update={"checks": False})})
    net = prepare_model(baseline, policy.model)
    return verify(net, quick, data, bundle=bundle, progress=progress)
