"""Standard training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams

__all__ = ["CE", "CEParams"]


class CEParams(ObjectiveParams):
    """Parameters of :class:`CE`.

    Attributes:
        label_smoothing: label smoothing of the cross-entropy (0 = none).
    """

    label_smoothing: float = Field(0.0, ge=0, lt=1)


@OBJECTIVES.register("ce")
class CE(Objective):
    """``CE(f(x), y)`` on the clean batch (the undefended baseline)."""

    name = "ce"
    Params = CEParams
    example_params = {}

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Clean cross-entropy."""
        return F.cross_entropy(ctx.logits(None), ctx.y, label_smoothing=self.params.label_smoothing)
