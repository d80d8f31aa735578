"""The worst-case cascade: each attack runs only on the examples still robust.

As in AutoAttack's standard evaluation, an example counts as robust only if every attack of
the suite fails on it; attacks run in order, each on the survivors of the previous ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harden.attacks.base import ATTACKS, Attack
from harden.batches import predictions
from harden.policy import AttackSpec, Catalog, ThreatModel

__all__ = ["SuiteResult", "attack_spec", "build_attack", "order_attacks", "preset_specs", "run_suite", "suite_labels"]


def attack_spec(name: str, params: dict[str, Any] | None = None) -> AttackSpec:
    """An :class:`AttackSpec` checked against the attack registry (params validated, defaults filled).

    Example:
        >>> attack_spec("pgd", {"steps": 3}).params["restarts"]
        1
    """
    return AttackSpec.model_validate(
        {"name": name, "params": dict(params or {})}, context={"harden": Catalog(attacks=ATTACKS)}
    )


def build_attack(spec: AttackSpec, threat: ThreatModel) -> Attack:
    """Instantiate the attack an :class:`AttackSpec` names under ``threat``.

    A spec checked by the policy's validation step hands over its validated ``Params`` (not
    validated again); an unchecked one is validated here.

    Example:
        >>> build_attack(AttackSpec(name="pgd", params={"steps": 3}), ThreatModel(eps=0.1)).params.steps
        3
    """
    return ATTACKS.get(spec.name)(threat, spec.params_for_build())


def suite_labels(names: Sequence[str]) -> list[str]:
    """Unique labels for attacks in a suite: ``pgd``, ``pgd#2``, ...

    Example:
        >>> suite_labels(["fgsm", "pgd", "pgd"])
        ['fgsm', 'pgd', 'pgd#2']
    """
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


@dataclass
class SuiteResult:
    """Per-example outcome of a suite on one batch (or several, concatenated).

    Attributes:
        labels: attack labels in cascade order.
        clean_correct: the model is right on the clean input.
        still_correct: per label, the example survived the cascade up to and including it.
        broken_by: per example, the label of the first attack that fooled it ("" if none, or
            "clean" if the clean input was already wrong).
        seconds: wall time per label.
        x_adv: only when asked for (``run_suite(..., keep_adversarial=True)``), per example the
            worst-case input on CPU: the adversarial example of the attack that fooled it, else
            that of the last attack of the cascade; the clean input where no attack ran (clean
            input already misclassified, or no attacks). Examples that were attacked are
            ``clean_correct`` (when the suite has attacks).
    """

    labels: list[str]
    clean_correct: torch.Tensor
    still_correct: dict[str, torch.Tensor]
    broken_by: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    x_adv: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def robust(self) -> torch.Tensor:
        """Survived every attack (worst case per example)."""
        return self.still_correct[self.labels[-1]] if self.labels else self.clean_correct

    def extend(self, other: SuiteResult) -> None:
        """Append another batch's result."""
        self.clean_correct = torch.cat([self.clean_correct, other.clean_correct])
        for k in self.labels:
            self.still_correct[k] = torch.cat([self.still_correct[k], other.still_correct[k]])
            self.seconds[k] = self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0)
        self.broken_by.extend(other.broken_by)
        both = self.x_adv is not None and other.x_adv is not None
        self.x_adv = torch.cat([self.x_adv, other.x_adv]) if both else None  # type: ignore[list-item]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return predictions(model(x))  # -1 for non-finite logits: wrong when clean, broken when attacked


@contextmanager
def _listening(
    attack: Attack, label: str, i: int, n: int, on_progress: Callable[[str, float], None] | None
) -> Iterator[None]:
    """Route ``attack``'s ticks to ``on_progress`` as the cascade's fraction done, for one call."""
    if on_progress is None:
        yield
        return
    before = attack.on_progress
    attack.on_progress = lambda done: on_progress(label, (i + done) / n)
    try:
        yield
    finally:
        attack.on_progress = before


def run_suite(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[Attack],
    *,
    keep_adversarial: bool = False,
    on_progress: Callable[[str, float], None] | None = None,
) -> SuiteResult:
    """Run ``attacks`` as a cascade on one batch; returns per-example outcomes on CPU.

    The model is evaluated in eval mode; its train/eval modes are restored afterwards. With
    ``keep_adversarial`` the result also holds each example's worst-case input (``x_adv``).
    ``on_progress(label, done)`` hears the running attack's label and the fraction of the
    cascade done (each attack an equal share, advanced by the attack's own :meth:`Attack.tick`).

    Example:
        >>> from harden.testing import TinyMLP
        >>> atk = build_attack(AttackSpec(name="fgsm"), ThreatModel(eps=0.1))
        >>> r = run_suite(TinyMLP(num_classes=2), torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), [atk])
        >>> r.labels, len(r.broken_by)
        (['fgsm'], 4)
    """
    from harden.attacks.base import restore_modes, save_modes

    labels = suite_labels([a.name for a in attacks])
    modes = save_modes(model)
    model.eval()
    try:
        correct = _predict(model, x) == y
        clean = correct.clone()
        broken = ["" if c else "clean" for c in clean.tolist()]
        still: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        worst = x.detach().clone() if keep_adversarial else None
        for i, (label, attack) in enumerate(zip(labels, attacks, strict=True)):
            t0 = time.perf_counter()
            idx = correct.nonzero().flatten()
            if idx.numel():
                with _listening(attack, label, i, len(attacks), on_progress):
                    x_adv = attack(model, x[idx], y[idx])
                fooled = _predict(model, x_adv) != y[idx]
                if worst is not None:
                    worst[idx] = x_adv.detach()
                for j in idx[fooled].tolist():
                    broken[j] = label
                correct[idx[fooled]] = False
            seconds[label] = time.perf_counter() - t0
            still[label] = correct.clone().cpu()
            if on_progress is not None:
                on_progress(label, (i + 1) / len(attacks))
    finally:
        restore_modes(model, modes)
    x_worst = worst.cpu() if worst is not None else None
    return SuiteResult(labels, clean.cpu(), still, broken, seconds, x_adv=x_worst)


def preset_specs(preset: str | None) -> list[AttackSpec]:
    """The attacks of a suite preset.

    ``reference`` is AutoAttack's standard suite with its reference settings: APGD-CE (100
    steps), APGD-T (100 steps for each of 9 target classes), FAB-T (the same) and Square (5,000
    queries). ``standard`` keeps the 100-step runs where they decide the figure: APGD-CE runs
    its 100 steps; APGD-T screens its 9 targets (one 10-step run each, torchattacks' own budget
    per target) and gives the 100-step run to each example's most promising target; FAB-T runs
    10 steps per target (torchattacks' budget: 100-step runs on each example's best target left
    exactly the same examples robust on the models measured, at 2-5x the cost); Square keeps
    its 5,000 queries. Measured in ``benchmarks/attacks.py``
    against torchattacks' ``AutoAttack(version="standard")``. ``quick`` is APGD-CE and APGD-T
    with 20 steps and 3 targets, for probes.

    Example:
        >>> [s.name for s in preset_specs("quick")]
        ['apgd_ce', 'apgd_t']
        >>> preset_specs("standard")[1].params["screen_steps"]  # the reference leaves it out (its default, None)
        10
        >>> "screen_steps" in preset_specs("reference")[1].params
        False
    """
    if preset is None:
        return []
    if preset in ("standard", "reference"):
        standard = preset == "standard"
        screen = {"screen_steps": 10, "full_targets": 1} if standard else {}
        return [
            attack_spec("apgd_ce", {"steps": 100}),
            attack_spec("apgd_t", {"steps": 100, "n_target_classes": 9, **screen}),
            attack_spec("fab_t", {"steps": 10 if standard else 100, "n_target_classes": 9}),
            attack_spec("square", {"n_queries": 5000}),
        ]
    if preset == "quick":
        return [
            attack_spec("apgd_ce", {"steps": 20}),
            attack_spec("apgd_t", {"steps": 20, "n_target_classes": 3}),
        ]
    raise ValueError(f"expected preset 'standard', 'reference' or 'quick', got {preset!r}")


def order_attacks(attacks: Sequence[Attack]) -> tuple[list[Attack], list[Attack]]:
    """Split into (l_p attacks: white-box first, then black-box; attacks outside the l_p model).

    Attacks outside the l_p model are the unbounded ones (``iwd``, ``invariance``) and the
    label-changing ones (``invariance_examples``).
    """
    inside = [a for a in attacks if a.bounded and not a.changes_label]
    lp = [a for a in inside if a.white_box] + [a for a in inside if not a.white_box]
    return lp, [a for a in attacks if a not in inside]
