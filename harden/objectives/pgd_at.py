"""PGD adversarial training (Madry et al., ICLR 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams, View, pgd_view

__all__ = ["PGDAT", "PGDATParams"]


class PGDATParams(ObjectiveParams):
    """Parameters of :class:`PGDAT`.

    Attributes:
        steps: PGD steps per batch (k of PGD-k).
        step_size: None means ``2.5 * eps / steps``.
        random_start: start each batch's attack from a random point of the ball.
    """

    steps: int = Field(7, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0)
    random_start: bool = True


@OBJECTIVES.register("pgd_at")
class PGDAT(Objective):
    """``CE(f(x_pgd), y)`` with ``x_pgd`` the last PGD-k iterate at the policy's threat model.

    The attack runs with the model in eval mode (BatchNorm statistics are not updated by the
    inner maximisation), as in the TRADES reference code.
    """

    name = "pgd_at"
    Params = PGDATParams
    example_params = {"steps": 2}

    def _view(self) -> View:
        p = self.params
        return pgd_view(p.steps, p.step_size, p.random_start)

    def views(self) -> tuple[View, ...]:
        """The PGD view."""
        return (self._view(),)

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Cross-entropy on the PGD examples."""
        return F.cross_entropy(ctx.logits(self._view()), ctx.y)
