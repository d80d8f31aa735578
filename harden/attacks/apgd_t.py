"""APGD-T (Croce & Hein, ICML 2020): APGD on the targeted DLR loss, with optional target screening.

The reference (AutoAttack's ``apgd-t``) runs ``steps`` (100) steps towards each of the
``n_target_classes`` (9) classes with the highest clean logits after the label, each target only
on the examples not fooled yet: on a robust model that is 9 full runs per example.

**Screening** (``screen_steps``, used by harden's ``standard`` preset) spends that budget where
it matters. Every target first gets one short run of ``screen_steps`` steps (a complete APGD run
with its own step-size schedule: 10 steps is what torchattacks' ``AutoAttack(version="standard")``
gives every target). Then, for each example still not fooled, the ``full_targets`` targets whose
short run reached the highest targeted-DLR loss (the loss is scale-free, so it ranks targets of
one example) get the reference's full runs of ``steps`` steps from fresh random starts. An
example is fooled as soon as any run fools it; with ``screen_steps`` unset (or ``>= steps``) the
attack is exactly the reference.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from harden.attacks.apgd import APGD, APGDParams, _Best
from harden.attacks.base import ATTACKS

__all__ = ["APGDT", "APGDTParams", "targeted_dlr_loss"]


class APGDTParams(APGDParams):
    """Parameters of :class:`APGDT`.

    Attributes:
        steps: iterations per full run (the reference uses 100).
        restarts: full runs from fresh random starts per target; later runs attack only the
            examples not yet fooled.
        rho: a checkpoint halves the step size when fewer than this fraction of the steps since
            the previous checkpoint increased the loss.
        eot: forward/backward passes averaged into each step's loss and gradient (EOT, Athalye
            et al. 2018), for models with a random forward pass; 1: one pass.
        n_target_classes: target the classes with the 2nd, 3rd, ... highest clean logit, this
            many of them (capped at ``num_classes - 1``).
        screen_steps: None (the reference): every target gets ``restarts`` full runs. Set: every
            target first gets one run of this many steps, then only the ``full_targets`` most
            promising targets per example get the full runs (see the module docstring).
        full_targets: with ``screen_steps``, the targets per example that get the full runs.
    """

    n_target_classes: int = Field(9, ge=1, le=100_000)
    #: left out of a policy's dump at their defaults: a policy that does not use them hashes as before
    added_later: ClassVar[frozenset[str]] = frozenset({"screen_steps", "full_targets"})
    screen_steps: int | None = Field(None, ge=1, le=100_000)
    full_targets: int = Field(1, ge=1, le=100_000)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, per example.

    ``z_pi1 >= z_pi2 >= ...`` are the sorted logits. With fewer than 4 classes there is no
    ``z_pi4`` and the loss falls back to the targeted margin ``z_t - z_y`` (denominator 1). A
    rank-clamped denominator is no good there: with 3 classes, ``z_pi1 - z_pi3`` lets the attack
    raise the loss towards 0 by pushing the third logit down, without ever crossing the decision
    boundary; with 2 classes it makes the loss constant. The margin keeps what matters to APGD:
    it is invariant to shifting the logits, and APGD is invariant to rescaling a loss.

    Example:
        >>> z = torch.tensor([[4.0, 2.0, 1.0, 0.0, -1.0]])
        >>> targeted_dlr_loss(z, torch.tensor([0]), torch.tensor([1]))
        tensor([-0.5714])
        >>> targeted_dlr_loss(z[:, :3], torch.tensor([0]), torch.tensor([1]))
        tensor([-2.])
    """
    if target is None:
        raise ValueError("expected target classes for the targeted DLR loss, got None")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    if logits.shape[1] < 4:
        return z_t - z_y
    top = logits.topk(4, dim=1).values
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


@ATTACKS.register("apgd_t")
class APGDT(APGD):
    """APGD on the targeted DLR loss (AutoAttack's ``apgd-t``), in the linf or l2 ball.

    The targets are the classes with the 2nd, 3rd, ... highest logit on the clean input; each
    gets ``restarts`` runs on the examples still robust (with ``screen_steps``: one short run
    each, then full runs for the most promising ones, see the module docstring). Success means
    misclassification (any class other than the label), as in AutoAttack. With fewer than 4
    classes see :func:`targeted_dlr_loss` for the loss used.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
        >>> attack = APGDT(ThreatModel(norm="l2", eps=0.5), {"steps": 20, "n_target_classes": 3})
        >>> adv = attack(TinyMLP(num_classes=5), x, y)
        >>> bool((adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5)
        True
        >>> screened = APGDT(ThreatModel(eps=0.1), {"steps": 20, "screen_steps": 5, "full_targets": 1})
        >>> screened(TinyMLP(num_classes=5), x, y).shape
        torch.Size([8, 1, 8, 8])
    """

    name = "apgd_t"
    Params = APGDTParams
    example_params = {"steps": 5, "n_target_classes": 2}

    def loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """The targeted DLR loss (:func:`targeted_dlr_loss`)."""
        return targeted_dlr_loss(logits, y, target)

    def _targets(self, clean_logits: torch.Tensor) -> list[torch.Tensor | None]:
        n_targets = min(self.params.n_target_classes, clean_logits.shape[1] - 1)
        order = clean_logits.argsort(dim=1, descending=True)
        return [order[:, r] for r in range(1, n_targets + 1)]

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reference's runs per target, or (with ``screen_steps``) screening then full runs."""
        p: APGDTParams = self.params
        if p.screen_steps is None or p.screen_steps >= p.steps:
            return super().perturb(model, x, y)
        clean_logits = self._clean_logits(model, x)
        best = _Best.start(x, y, clean_logits)
        listed = [t for t in self._targets(clean_logits) if t is not None]
        if not listed:  # one class: no target to attack
            return best.out
        targets = torch.stack(listed, dim=1)
        k = targets.shape[1]
        full = min(p.full_targets, k)
        total = k * p.screen_steps + full * p.restarts * p.steps  # steps per example, for the progress
        score = torch.full(targets.shape, float("-inf"), device=x.device)
        for r in range(k):
            todo = (~best.fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                return best.out
            adv, fooled, loss = self._run(model, x[todo], y[todo], targets[todo, r], p.screen_steps)
            best.take(todo, adv, fooled, loss)
            score[todo, r] = loss
            self.tick((r + 1) * p.screen_steps / total)
        ranked = targets.gather(1, score.argsort(dim=1, descending=True, stable=True))
        for j in range(full):
            if not self._runs(model, x, y, ranked[:, j], p.steps, p.restarts, best):
                break
            self.tick((k * p.screen_steps + (j + 1) * p.restarts * p.steps) / total)
        return best.out
