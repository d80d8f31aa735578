"""``harden.verify``: clean accuracy and per-example worst-case robust accuracy of a suite.

Attacks run as a cascade (each only on the examples still robust); the report gives the
worst case and how many examples survived after each attack, per class too. The examples are a
seeded class-balanced sample of the test split (``verify.sample``); the eps sweep and the
sanity checks run on a smaller class-balanced subset of them (``verify.check_examples``), whose
own clean accuracy the report states beside the headline one. The eps sweep attacks its radii
smallest first, each continuing the one below, and the checks continue its runs
(:class:`harden.checks.CheckContext`); the report says where the time went
(:meth:`RobustnessReport.time_split`) and what each check cost.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harden._cascade import CascadeTally, prepared_attacks, run_cascade
from harden.attacks.base import Attack, restore_modes, save_modes
from harden.attacks.suite import preset_specs
from harden.checks import CheckContext, run_checks
from harden.data import DataBundle, EvalData, load_data
from harden.errors import DataError, ModelError
from harden.models import model_device, prepare_model
from harden.policy import Policy
from harden.policy_io import checked

#: classes listed one by one in :meth:`RobustnessReport.summary` (beyond: the worst few)
SUMMARY_CLASSES = 20

__all__ = ["RobustnessReport", "verify"]


@dataclass
class RobustnessReport:
    """The outcome of :func:`verify`.

    Attributes:
        n: examples evaluated (``verify.n_examples`` of the test split, or all of it if fewer).
        clean_accuracy: accuracy on clean inputs of those ``n`` examples (the headline).
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
        eps_curve: ``(eps, accuracy)`` pairs of the eps sweep, on the check subset (eps 0 is its
            clean accuracy, ``check_clean_accuracy``).
        checks: sanity-check results by id (``status``: PASS, WARN, FAIL or SKIP, ``detail``,
            ``raised_if``, ``remedy``). SKIP: the check had nothing to test; never a pass.
        outcomes: per verified example, in data order: ``indices``, its index in the data
            verified (the test split); ``broken_by``, the attack that first fooled it
            (``"clean"`` when wrong on clean input, ``""`` when the whole l_p suite left it
            right); and ``other``, per attack outside the l_p threat model, 1 right / 0 wrong /
            -1 not measured. ``harden compare`` pairs runs on them.
        adversarial: with ``verify(..., keep_adversarial=k)``, up to ``k`` worst-case inputs of
            the l_p suite (CPU, float32 pixels in [0, 1]): the examples an attack fooled first,
            then attacked examples that survived (their last attack's output), in data order
            within each group. None when not asked for or no example was attacked. Not part of
            :meth:`to_dict` (JSON).
        per_class: per class, ``{"label", "name", "n", "clean", "robust"}``: counts of the
            verified examples of that class, right on clean input, and right under the whole
            l_p suite (``name`` None where the data names no classes).
        check_n: examples of the check subset (the eps sweep's and the sanity checks').
        check_clean_accuracy: clean accuracy on the check subset (the eps curve's eps-0 point);
            0.0 when ``check_n`` is 0.
        sample: how the examples were drawn from the data: ``balanced`` (a seeded
            class-balanced sample) or ``first`` (the first ``n``).
        sweep_seconds: wall time of the eps sweep.
        check_seconds: wall time of the sanity checks, in all.
        per_check_seconds: wall time of each sanity check by id (the attacks it ran included;
            the PGD runs it continues from the eps sweep count in ``sweep_seconds``).
        setup_seconds: wall time before the cascade: loading data, building and preparing the
            attacks (a transfer surrogate trained here, the invariance-example pool).
        cascade_seconds: wall time of the cascade: the l_p attacks (``attack_seconds``), the
            attacks outside the l_p threat model and the per-batch bookkeeping.
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
    per_class: list[dict[str, Any]] = field(default_factory=list)
    check_n: int = 0
    check_clean_accuracy: float = 0.0
    sample: str = "first"
    sweep_seconds: float = 0.0
    check_seconds: float = 0.0
    per_check_seconds: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = 0.0
    cascade_seconds: float = 0.0

    @property
    def reliable(self) -> bool:
        """False when any sanity check failed (the certificate is then UNRELIABLE); a SKIP is no failure, and no pass."""
        return all(c["status"] != "FAIL" for c in self.checks.values())

    def check_counts(self) -> dict[str, int]:
        """How many checks ended in each status (``PASS``, ``WARN``, ``FAIL``, ``SKIP``).

        Example:
            >>> r = RobustnessReport(1, 1.0, 1.0, {}, {}, {}, {}, [], 0.0, checks={"a": {"status": "SKIP"}})
            >>> r.check_counts()
            {'PASS': 0, 'WARN': 0, 'FAIL': 0, 'SKIP': 1}
        """
        counts = dict.fromkeys(("PASS", "WARN", "FAIL", "SKIP"), 0)
        for c in self.checks.values():
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        return counts

    def time_split(self) -> dict[str, float]:
        """Where the wall time of :func:`verify` went, in seconds; the parts add up to ``seconds``.

        ``attacks``: the l_p attacks; ``other_attacks``: the rest of the cascade (attacks outside
        the l_p threat model, per-batch bookkeeping); ``setup``; ``checks``; ``eps_sweep``;
        ``rest``: the remainder (model preparation, the report).

        Example:
            >>> r = RobustnessReport(1, 1.0, 1.0, {}, {}, {"pgd": 6.0}, {}, [], 10.0, cascade_seconds=7.0,
            ...     check_seconds=1.5, sweep_seconds=1.0, setup_seconds=0.25)
            >>> r.time_split()
            {'attacks': 6.0, 'other_attacks': 1.0, 'setup': 0.25, 'checks': 1.5, 'eps_sweep': 1.0, 'rest': 0.25}
        """
        attacks = sum(self.attack_seconds.values())
        out = {
            "attacks": attacks,
            "other_attacks": max(self.cascade_seconds - attacks, 0.0),
            "setup": self.setup_seconds,
            "checks": self.check_seconds,
            "eps_sweep": self.sweep_seconds,
        }
        out["rest"] = max(self.seconds - sum(out.values()), 0.0)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (without the ``adversarial`` tensor)."""
        d = asdict(replace(self, adversarial=None))
        del d["adversarial"]
        return d

    def summary(self) -> str:
        """A few lines for people: the accuracies, per class, the eps curve and the checks (with their subset)."""
        drawn = "class-balanced sample" if self.sample == "balanced" else "first examples"
        lines = [f"clean accuracy   {self.clean_accuracy:7.2%}  (n={self.n}, {drawn})"]
        for label, acc in self.per_attack.items():
            lines.append(f"  after {label:<10}{acc:7.2%}  ({self.attack_seconds.get(label, 0.0):.1f} s)")
        t = self.threat
        lines.append(f"robust accuracy  {self.robust_accuracy:7.2%}  ({t['norm']}, eps={t['eps']})")
        for label, acc in self.other_threats.items():
            what = "agreement with the new label" if label.startswith("invariance_examples") else "accuracy"
            count = self.other_counts.get(label, self.n)
            lines.append(f"{label:<17}{acc:7.2%}  ({what}, n={count}; outside the l_p threat model)")
        lines += self._per_class_lines()
        subset = f"check subset, n={self.check_n}, clean accuracy {self.check_clean_accuracy:.2%}"
        if self.eps_curve:
            lines.append(f"eps curve ({subset}): " + "  ".join(f"{e:g}:{a:.0%}" for e, a in self.eps_curve))
        if self.checks:
            lines.append(f"sanity checks ({subset}):")
        for cid, c in self.checks.items():
            status = "SKIP (N/A)" if c["status"] == "SKIP" else c["status"]
            cost = f" ({self.per_check_seconds[cid]:.1f} s)" if cid in self.per_check_seconds else ""
            lines.append(f"  check {status:<4} {cid}: {c['detail']}{cost}")
        if self.checks:
            counts = self.check_counts()
            tally = f"{counts['PASS']} checks pass" + (f", {counts['WARN']} warn" if counts["WARN"] else "")
            tally += f", {counts['FAIL']} failed" if counts["FAIL"] else ""
            word = (
                "UNRELIABLE"
                if not self.reliable
                else "RELIABLE"
                if counts["PASS"]
                else "NOT ASSESSED (no check passed)"
            )
            lines.append(f"evaluation {word} ({tally}, {counts['SKIP']} skipped, N/A)")
        if self.cascade_seconds > 0:  # verify measured where its time went
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.time_split().items() if v >= 0.05)
            lines.append(f"time {self.seconds:.1f} s: {parts}")
        return "\n".join(lines)

    def _per_class_lines(self) -> list[str]:
        """Per-class clean / robust accuracy: every class up to :data:`SUMMARY_CLASSES`, else the worst 5."""
        seen = [c for c in self.per_class if c["n"]]
        if len(seen) < 2:
            return []
        shown, title = seen, "per class         clean   robust"
        if len(seen) > SUMMARY_CLASSES:
            shown = sorted(seen, key=lambda c: (c["robust"] / c["n"], c["clean"] / c["n"], c["label"]))[:5]
            title = f"per class (the 5 of {len(seen)} with the lowest robust accuracy)   clean   robust"
        lines = [title]
        for c in shown:
            name = f"{c['label']} {c['name']}" if c["name"] not in (None, str(c["label"])) else str(c["label"])
            lines.append(f"  {name[:14]:<14}{c['clean'] / c['n']:7.1%}  {c['robust'] / c['n']:7.1%}  (n={c['n']})")
        return lines


def _check_head(logits: int, classes: int | None, needed: int) -> None:
    """A one-line ModelError when the model's head cannot score the data's classes (not a data error)."""
    if classes is not None and logits != classes:
        raise ModelError(
            f"expected the model to output {classes} logits (the data has {classes} classes), got {logits}: "
            "set model.num_classes / the classifier size to the data's classes"
        )
    if logits < needed:
        raise ModelError(
            f"expected the model to output at least {needed} logits (the labels go up to {needed - 1}), got {logits}: "
            "set model.num_classes / the classifier size to the data's classes"
        )


def _eps_curve(ctx: CheckContext, policy: Policy, clean: float, progress: bool) -> list[tuple[float, float]]:
    """Accuracy on the check subset per radius, smallest first; eps 0 is its clean accuracy ``clean``.

    At the threat's eps it is the suite's own worst case on the subset (the cascade's points, not
    attacked again). Above it, each radius continues the one below with PGD: an example fooled at
    a smaller radius stays fooled (its point is inside the larger ball) and only the examples
    still right are attacked, from their point there. Below it, the radii go largest first and
    each attacks with PGD only the examples fooled at the next larger one, from their point
    there; one that no attack fooled in the larger ball counts as right
    (:meth:`harden.checks.CheckContext.attack`). Every figure stays an upper bound of the
    accuracy under attack at its radius, and the curve never rises for a deterministic model.
    The runs are cached in ``ctx``: the checks continue them (the suite's outcome is the base
    run of ``more_iterations_never_help``).
    """
    spec = policy.verify
    asked = (
        spec.eps_sweep if spec.eps_sweep is not None else tuple(f * policy.threat.eps for f in (0.25, 0.5, 1, 1.5, 2))
    )
    radii = [e for e in sorted(asked) if not (policy.threat.norm == "linf" and e > 1)]  # linf 1 covers the box
    if not radii:
        return []
    threat = policy.threat.eps
    order = sorted((e for e in radii if e < threat), reverse=True) + [e for e in radii if e >= threat]
    right: dict[float, int] = {}
    with tqdm(total=len(radii), desc="eps sweep", disable=not progress, leave=False, unit="eps") as bar:
        for eps in order:
            bar.set_postfix_str(f"eps={eps:g}", refresh=False)
            right[eps] = int(ctx.attack(float(eps)).right.sum())
            bar.update(1)
    return [(0.0, clean), *((float(e), right[e] / len(ctx.y)) for e in radii)]  # whole counts over n, in float64


def _check_context(
    net: nn.Module,
    cx: torch.Tensor,
    cy: torch.Tensor,
    num_classes: int,
    tally: CascadeTally,
    lp_attacks: list[Attack],
    policy: Policy,
    history: list[dict[str, Any]] | None,
) -> CheckContext:
    """What the eps sweep and the sanity checks share: the check examples ``(cx, cy)`` and the cascade's outcomes.

    The suite's worst-case inputs of the check examples are the run at the threat's eps.
    """
    labels = list(zip(tally.result.labels, lp_attacks, strict=True))
    return CheckContext(
        net,
        cx,
        cy,
        policy.threat,
        num_classes,
        steps=policy.verify.check_steps,
        sweep_steps=policy.verify.sweep_steps,
        broken_by=tally.result.broken_by,
        white_box=[lb for lb, a in labels if a.white_box],
        history=history or [],
        black_box=[lb for lb, a in labels if not a.white_box],
        indices=tally.indices,
        seed=policy.seed,
        suite_adv=torch.cat(tally.check_adv) if tally.check_adv and lp_attacks else None,  # no l_p attack: PGD
    )


def _class_names(data: EvalData, bundle: DataBundle | None) -> tuple[str, ...] | None:
    """The class names of the bundle, else of the data (a Dataset's or its loader's ``classes``), else None."""
    if bundle is not None:
        return bundle.class_names
    ds = data.dataset if isinstance(data, DataLoader) else data
    names = getattr(ds, "classes", None)
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


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

    The examples are ``verify.n_examples`` of ``data``: a class-balanced sample seeded by
    ``policy.seed`` (``verify.sample: first``: the first N; ``report.outcomes["indices"]`` says
    which). The l_p attacks run as a cascade (white-box first), each only on the examples still
    robust; attacks outside the l_p threat model run on every example and are reported apart.
    Then the eps sweep and the sanity checks run on a class-balanced subset of
    ``verify.check_examples`` of them (its clean accuracy is ``report.check_clean_accuracy``):
    the sweep's radii each continue the one below (an example fooled at a smaller radius stays
    fooled, only the others are attacked again), and the checks continue the sweep's runs.
    The model is used on the device it is on (batches follow it) and its train/eval modes are
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
        progress: show progress bars (the attacks, the eps sweep, the checks).
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
    setup = time.perf_counter() - t0
    modes = save_modes(net)
    net.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(policy.seed)
            t1 = time.perf_counter()
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
                sample=policy.verify.sample,
                seed=policy.seed,
            )
            cascade = time.perf_counter() - t1
            cx, cy = torch.cat(tally.check_x), torch.cat(tally.check_y)
            with torch.no_grad():
                logits = int(net(cx[:1]).shape[1])
            _check_head(logits, bundle.num_classes if bundle is not None else None, int(cy.max()) + 1)
            num_classes = bundle.num_classes if bundle is not None else logits
            fields = tally.report_fields(
                policy, specs, 0.0, num_classes=num_classes, class_names=_class_names(data, bundle)
            )
            ctx = _check_context(net, cx, cy, num_classes, tally, lp_attacks, policy, history)
            t2 = time.perf_counter()
            curve = _eps_curve(ctx, policy, fields["check_clean_accuracy"], progress)
            t3 = time.perf_counter()
            results = run_checks(ctx, progress=progress) if policy.verify.checks else {}
            t4 = time.perf_counter()
    finally:
        restore_modes(net, modes)
    return RobustnessReport(
        **{**fields, "seconds": time.perf_counter() - t0},
        eps_curve=curve,
        checks={k: v.to_dict() for k, v in results.items()},
        adversarial=tally.adversarial,
        sweep_seconds=t3 - t2,
        check_seconds=t4 - t3,
        per_check_seconds={k: v.seconds for k, v in results.items()},
        setup_seconds=setup,
        cascade_seconds=cascade,
    )
