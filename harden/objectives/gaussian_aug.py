"""Gaussian data augmentation: the base-classifier training of randomized smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams

__all__ = ["GaussianAug", "GaussianAugParams"]


class GaussianAugParams(ObjectiveParams):
    """Parameters of :class:`GaussianAug`.

    Attributes:
        sigma: noise standard deviation in pixel units; use the ``certify.sigma`` the model
            will be smoothed with (Cohen et al. train and certify at the same sigma).
    """

    sigma: float = Field(0.25, gt=0, le=10)


@OBJECTIVES.register("gaussian_aug")
class GaussianAug(Objective):
    """``CE(f(x + d), y)`` with ``d ~ N(0, sigma^2 I)`` (Cohen, Rosenfeld & Kolter, ICML 2019).

    A base model trained this way makes the smoothed classifier of ``harden.certify`` accurate
    under noise, so it certifies larger l2 radii. The noise is not clipped to [0, 1], as in the
    paper and as :func:`harden.smoothing.smooth_certify` samples it. The noisy batch is drawn
    once per batch and shared by every ``gaussian_aug`` term with the same sigma.
    """

    name = "gaussian_aug"
    Params = GaussianAugParams
    example_params = {}

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Cross-entropy on the noisy batch."""
        key = ("gaussian_aug", self.params.sigma)
        noisy = ctx.memo(key, lambda: ctx.x.detach() + self.params.sigma * torch.randn_like(ctx.x))
        return F.cross_entropy(ctx.forward(key, noisy), ctx.y)
