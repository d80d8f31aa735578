"""``harden.verify``: clean accuracy and per-example worst-case robust accuracy of a suite.

Attacks run as a cascade (each only on the examples still robust); the report gives the
worst case and how many examples survived after each attack.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from harden._cascade import CascadeTally, prepared_attacks, run_cascade
from harden.attacks import ATTACKS
from harden.attacks.base import Attack, restore_modes, save_modes
from harden.attacks.suite import preset_specs
from harden.checks import CheckContext, run_checks
from harden.data import DataBundle, EvalData, load_data
from harden.errors import DataError
from harden.models import model_device, prepare_model
from harden.policy import Policy
from harden.policy_io import checked
from harden.probe import accuracy

__all__ = ["RobustnessReport", "verify"]


@dataclass
class RobustnessReport:
    """The outcome of :func:`verify`.

    Attributes:
        n: examples evaluated.
        clean_accuracy: accuracy on clean inputs.
        robust_accuracy: accuracy under the per-example worst case of the whole suite.
        per_attack: per attack label, the accuracy after the cascade up to and including it
            (non-increasing; the last equals ``robust_accuracy``). White-box attacks run first.
        broken_by: per attack label, how many examples it was the first to fool.
        attack_seconds: wall time per attack.
        threat: the threat model.
        attacks: the attack specifications, in cascade order.
        seconds: total wall time.
        seed: the seed of the attacks.
        other_threats: accuracy under attacks outside the l_p threat model (``iwd``,
            ``invariance``), each run on all examples; for label-changing invariance examples
            (``invariance_examples``), agreement with the new label.
        other_counts: per entry of ``other_threats``, the examples it was measured on.
        eps_curve: ``(eps, accuracy)`` pairs of the eps sweep (eps 0 is clean accuracy).
        checks: sanity-check results by id (``status``, ``detail``, ``raised_if``, ``remedy``).
        outcomes: per example, in data order (the first ``n`` of the data): ``broken_by``, the
            attack that first fooled it (``"clean"`` when wrong on clean input, ``""`` when the
            whole l_p suite left it right), and ``other``, per attack outside the l_p threat
            model, 1 right / 0 wrong / -1 not measured. ``harden compare`` pairs runs on them.
        adversarial: with ``verify(..., keep_adversarial=k)``, up to ``k`` worst-case inputs of
            the l_p suite (CPU, float32 pixels in [0, 1]): the examples an attack fooled first,
            then attacked examples that survived (their last attack's output), in data order
            within each group. None when not asked for or no example was attacked. Not part of
            :meth:`to_dict` (JSON).
    """

    n: int
    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict[str, float]
    broken_by: dict[str, int]
    attack_seconds: dict[str, float]
    threat: dict[str, Any]
    attacks: list[dict[str, Any]]
    seconds: float
    seed: int = 0
    other_threats: dict[str, float] = field(default_factory=dict)
    other_counts: dict[str, int] = field(default_factory=dict)
    eps_curve: list[tuple[float, float]] = field(default_factory=list)
    checks: dict[str, dict[str, str]] = field(default_factory=dict)
    outcomes: dict[str, Any] = field(default_factory=dict, repr=False)
    data_name: str = ""
    adversarial: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def reliable(self) -> bool:
        """False when any sanity check failed (the certificate is then UNRELIABLE)."""
        return all(c["status"] != "FAIL" for c in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (without the ``adversarial`` tensor)."""
        d = asdict(replace(self, adversarial=None))
        del d["adversarial"]
        return d

    def summary(self) -> str:
        """A few lines for people."""
        lines = [f"clean accuracy   {self.clean_accuracy:7.2%}  (n={self.n})"]
        for label, acc in self.per_attack.items():
            lines.append(f"  after {label:<10}{acc:7.2%}  ({self.attack_seconds.get(label, 0.0):.1f} s)")
        t = self.threat
        lines.append(f"robust accuracy  {self.robust_accuracy:7.2%}  ({t['norm']}, eps={t['eps']})")
        for label, acc in self.other_threats.items():
            what = "agreement with the new label" if label.startswith("invariance_examples") else "accuracy"
            count = self.other_counts.get(label, self.n)
            lines.append(f"{label:<17}{acc:7.2%}  ({what}, n={count}; outside the l_p threat model)")
        if self.eps_curve:
            lines.append("eps curve        " + "  ".join(f"{e:g}:{a:.0%}" for e, a in self.eps_curve))
        for cid, c in self.checks.items():
            lines.append(f"check {c['status']:<4} {cid}: {c['detail']}")
        if self.checks:
            lines.append(
                "evaluation " + ("RELIABLE (all checks pass)" if self.reliable else "UNRELIABLE (a check failed)")
            )
        return "\n".join(lines)


def _eps_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, policy: Policy) -> list[tuple[float, float]]:
    spec = policy.verify
    radii = (
        spec.eps_sweep if spec.eps_sweep is not None else tuple(f * policy.threat.eps for f in (0.25, 0.5, 1, 1.5, 2))
    )
    if not radii:
        return []
    out = [(0.0, float(accuracy(model, x, y).float().mean()))]
    for eps in sorted(radii):
        if policy.threat.norm == "linf" and eps > 1:
            continue
        pgd = ATTACKS.get("pgd")(policy.threat.model_copy(update={"eps": eps}), {"steps": spec.check_steps})
        out.append((float(eps), float(accuracy(model, pgd(model, x, y), y).float().mean())))
    return out


def _sanity_checks(
    net: nn.Module,
    cx: torch.Tensor,
    cy: torch.Tensor,
    tally: CascadeTally,
    lp_attacks: list[Attack],
    policy: Policy,
    history: list[dict[str, Any]] | None,
) -> dict[str, dict[str, str]]:
    """Run the sanity checks on the check examples ``(cx, cy)``, with the cascade's outcomes."""
    result = tally.result
    ctx = CheckContext(
        net,
        cx,
        cy,
        policy.threat,
        int(net(cx[:1]).shape[1]),
        steps=policy.verify.check_steps,
        broken_by=result.broken_by,
        white_box=[lb for lb, a in zip(result.labels, lp_attacks, strict=True) if a.white_box],
        history=history or [],
    )
    return {k: v.to_dict() for k, v in run_checks(ctx).items()}


def verify(
    model: nn.Module,
    policy: Policy,
    data: EvalData | None = None,
    *,
    bundle: DataBundle | None = None,
    history: list[dict[str, Any]] | None = None,
    progress: bool = True,
    keep_adversarial: int = 0,
) -> RobustnessReport:
    """Attack ``model`` with the policy's suite on ``data`` (default: the policy's test split).

    The l_p attacks run as a cascade (white-box first), each only on the examples still robust;
    attacks outside the l_p threat model run on every example and are reported apart. Then the
    eps sweep and the sanity checks run on the first ``verify.check_examples`` examples. The
    model is used on the device it is on (batches follow it) and its train/eval modes are
    restored. Attacks are seeded with ``policy.seed`` without touching the global RNG.

    Args:
        model: a classifier taking [0, 1] pixels (wrapped with the policy's mean/std if it is
            not already :class:`harden.models.Normalized`).
        policy: gives the threat model, the attacks and ``verify.n_examples``.
        data: a DataLoader, a Dataset, or an ``(x, y)`` pair of tensors; None: the test split
            of ``bundle`` (or of the policy's data).
        bundle: the policy's data already loaded (:func:`harden.data.load_data`): attacks that
            read the training split (the ``invariance_examples`` pool, the ``transfer``
            surrogate) use its train split. None: the policy's data is loaded if one needs it,
            so a measurement does not depend on who called.
        history: the training history, for the catastrophic-overfitting check.
        progress: show a progress bar.
        keep_adversarial: keep up to this many worst-case adversarial inputs of the l_p suite in
            ``report.adversarial`` (for parity tests of an exported model); 0 keeps none.

    Returns:
        A :class:`RobustnessReport`.

    Raises:
        DataError: no examples, pixels outside [0, 1], or a negative ``keep_adversarial``.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> report = verify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(32), progress=False)
        >>> report.n, report.robust_accuracy <= report.clean_accuracy
        (32, True)
        >>> kept = verify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(32), progress=False, keep_adversarial=4)
        >>> kept.adversarial is None or kept.adversarial.shape[1:] == (1, 8, 8)
        True
    """
    if isinstance(keep_adversarial, bool) or not isinstance(keep_adversarial, int) or keep_adversarial < 0:
        raise DataError(f"expected keep_adversarial as an integer >= 0, got {keep_adversarial!r}")
    t0 = time.perf_counter()
    policy = checked(policy)  # a policy built in Python is checked (and its params filled) as a loaded one is
    net = prepare_model(model, policy.model)
    device = model_device(net)
    if data is None:
        bundle = bundle if bundle is not None else load_data(policy.data)
        data = bundle.test
    specs = [*preset_specs(policy.verify.preset), *policy.verify.attacks]
    lp_attacks, other_attacks, other_caps = prepared_attacks(specs, policy, bundle, device)
    modes = save_modes(net)
    net.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(policy.seed)
            tally = run_cascade(
                net,
                data,
                lp_attacks,
                other_attacks,
                other_caps,
                device,
                batch_size=policy.data.eval_batch_size,
                limit=policy.verify.n_examples,
                desc="verify",
                progress=progress,
                check_examples=policy.verify.check_examples,
                keep_adversarial=keep_adversarial,
            )
            cx, cy = torch.cat(tally.check_x), torch.cat(tally.check_y)
            curve = _eps_curve(net, cx, cy, policy)
            checks = _sanity_checks(net, cx, cy, tally, lp_attacks, policy, history) if policy.verify.checks else {}
    finally:
        restore_modes(net, modes)
    return RobustnessReport(
        **tally.report_fields(policy, specs, time.perf_counter() - t0),
        eps_curve=curve,
        checks=checks,
        adversarial=tally.adversarial,
    )
