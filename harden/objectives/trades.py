"""TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams, View

__all__ = ["TRADES", "TRADESParams"]


class TRADESParams(ObjectiveParams):
    """Parameters of :class:`TRADES`.

    Attributes:
        beta: weight of the robustness (KL) term; 6.0 in the paper.
        steps: steps of the KL-maximising PGD (10 in the paper).
        step_size: None means ``eps / 4`` (the paper's 0.007 for eps = 0.031 on CIFAR-10).
    """

    beta: float = Field(6.0, ge=0)
    steps: int = Field(10, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0)


@OBJECTIVES.register("trades")
class TRADES(Objective):
    """``CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x'))``.

    ``x'`` maximises the KL term by PGD from a random start (the paper starts at
    ``x + 0.001 * N(0, I)``; we start uniformly in the ball, which the KL gradient also needs).
    """

    name = "trades"
    Params = TRADESParams
    example_params = {"steps": 2}

    def _view(self, eps: float) -> View:
        p = self.params
        step = p.step_size if p.step_size is not None else eps / 4
        return View.of("pgd", {"steps": p.steps, "step_size": step, "loss": "kl", "select": "last"})

    def views(self) -> tuple[View, ...]:
        """The KL-PGD view."""
        return (self._view(self.threat.eps),)

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Natural CE plus beta times the batch-mean KL between clean and adversarial outputs."""
        clean = ctx.logits(None)
        adv = ctx.logits(self._view(ctx.threat.eps))
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return F.cross_entropy(clean, ctx.y) + self.params.beta * kl
