"""The outcome of :func:`harden.verify`: :class:`RobustnessReport` (accuracies, checks, where the time went)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

#: classes listed one by one in :meth:`RobustnessReport.summary` (beyond: the worst few)
SUMMARY_CLASSES = 20

__all__ = ["SUMMARY_CLASSES", "RobustnessReport"]


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
