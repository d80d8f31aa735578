"""PGD (Madry et al. 2018): projected gradient ascent with random start and restarts."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, EOTParams, input_grad, normalize_grad, project
from harden.batches import predictions

__all__ = ["PGD", "PGDParams", "random_start"]


class PGDParams(EOTParams):
    """Parameters of :class:`PGD`.

    Attributes:
        steps: gradient steps per restart.
        step_size: step length; None means ``2.5 * eps / steps`` (Madry et al.'s rule).
        random_start: start from a uniform point of the eps ball (linf) or a random direction
            scaled uniformly in the ball (l2).
        restarts: independent runs; later runs attack only the examples still correct.
        loss: ``ce`` (cross-entropy with the label) or ``kl`` (KL divergence from the clean
            prediction, the TRADES inner maximisation).
        select: ``misclassified`` keeps, per example, the first iterate that fools the model
            (the strongest evaluation); ``last`` returns the last iterate (as in training).
        eot: forward/backward passes averaged into each step's gradient (EOT, Athalye et al.
            2018), for models with a random forward pass; 1: one pass.
    """

    steps: int = Field(10, ge=1, le=100_000)
    step_size: float | None = Field(None, gt=0)
    random_start: bool = True
    restarts: int = Field(1, ge=1, le=1000)
    loss: Literal["ce", "kl"] = "ce"
    select: Literal["misclassified", "last"] = "misclassified"


def random_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A random point of the eps ball around ``x``, clipped to [0, 1] (global RNG)."""
    if norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:
        d = torch.randn_like(x)
        n = d.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        r = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view_as(n)
        delta = d / n * r * eps
    return (x + delta).clamp(0.0, 1.0)


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient descent on the loss, in the linf or l2 ball.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> adv = PGD(ThreatModel(norm="l2", eps=0.5), {"steps": 5})(TinyMLP(num_classes=2), x, y)
        >>> bool((adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5)
        True
    """

    name = "pgd"
    Params = PGDParams
    example_params = {"steps": 5}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run ``restarts`` PGD runs, each on the examples the previous ones did not fool."""
        p: PGDParams = self.params
        best = x.clone()
        todo = torch.arange(x.shape[0], device=x.device)
        for _ in range(p.restarts):
            if todo.numel() == 0:
                break
            adv, fooled = self._run(model, x[todo], y[todo])
            best[todo] = adv
            if p.loss == "kl" or p.select == "last":
                break  # no notion of success to restart on
            todo = todo[~fooled]
        return best

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p: PGDParams = self.params
        norm, eps = self.threat.norm, self.threat.eps
        alpha = p.step_size if p.step_size is not None else 2.5 * eps / p.steps
        if p.loss == "kl":
            with torch.no_grad():
                target = F.softmax(model(x), dim=1)

            def loss_fn(logits: torch.Tensor) -> torch.Tensor:
                return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(dim=1)
        else:

            def loss_fn(logits: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(logits, y, reduction="none")

        x_adv = random_start(x, norm, eps) if p.random_start else x.clone()
        keep_best = p.select == "misclassified" and p.loss == "ce"
        best = x_adv.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(p.steps):
            logits, grad = input_grad(model, x_adv, loss_fn, p.eot)
            if keep_best:
                newly = (predictions(logits) != y) & ~fooled  # NaN logits: fooled, kept
                best[newly] = x_adv[newly]
                fooled |= newly
            x_adv = project(x_adv + alpha * normalize_grad(grad, norm), x, norm, eps)
        if not keep_best:
            return x_adv, fooled
        with torch.no_grad():
            newly = (predictions(model(x_adv)) != y) & ~fooled
        fooled |= newly
        best[~fooled | newly] = x_adv[~fooled | newly]
        return best, fooled
