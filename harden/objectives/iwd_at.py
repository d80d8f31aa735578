"""IWD adversarial training: train on internal-Wasserstein-distance adversarial examples.

Our formulation of arXiv 2103.07598 (the paper's full text was not available to us). Each batch
is attacked with the IWD attack (:mod:`harden.attacks.iwd`: maximise CE subject to
``IWD(x, x') <= rho``, the policy's ``threat.rho``, 2e-3 when unset) and the model minimises

``clean_weight * CE(f(x), y) + (1 - clean_weight) * L_adv``

with ``L_adv = CE(f(x_iwd), y)`` (``loss: ce``) or the TRADES-style
``beta * KL(softmax f(x) || softmax f(x_iwd))`` (``loss: kl``). The attack runs in eval mode on
the first ``fraction`` of the batch (a quarter by default), with fewer and larger steps than the
evaluation attack (5 of 0.05 instead of 50 of 0.02). Its patch geometry is the evaluation
attack's by default (``patch_size``/``stride`` None: 3x3 patches at stride 1 up to 32 px), since
``rho`` means something for one geometry only: to train at a cheaper geometry (3x3 at stride 2
keeps the patches overlapping at a quarter of the patches), give the ``iwd`` attack the same one
and calibrate ``rho`` for it (:func:`harden.attacks.iwd.calibrate_rho`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from harden.attacks.iwd import IWDAttack
from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams

__all__ = ["IWDAT", "IWDATParams"]


class IWDATParams(ObjectiveParams):
    """Parameters of :class:`IWDAT`.

    Attributes:
        clean_weight: weight of the clean CE; the IWD term gets ``1 - clean_weight``.
        loss: ``ce`` (CE on the IWD examples) or ``kl`` (TRADES-style KL to the clean output).
        beta: multiplier of the KL term when ``loss: kl``.
        fraction: share of the batch attacked (its first examples).
        steps: IWD attack steps per batch.
        step_size: IWD attack signed step per pixel.
        patch_size: IWD patch size (None: the attack's default, 3).
        stride: IWD patch stride (None: the attack's default, 1 up to 32 px).
        linf_cap: optional l_inf bound of the IWD examples.
        tol: relative Sinkhorn tolerance of the attack's IWD evaluations (1e-2: about 3 times
            fewer iterations than the evaluation's 3e-3, IWD values within about 0.5 %).
    """

    clean_weight: float = Field(0.5, ge=0, le=1)
    loss: Literal["ce", "kl"] = "ce"
    beta: float = Field(6.0, ge=0)
    fraction: float = Field(0.25, gt=0, le=1)
    steps: int = Field(5, ge=1, le=10_000)
    step_size: float = Field(0.05, gt=0, le=1)
    patch_size: int | None = Field(None, ge=1)
    stride: int | None = Field(None, ge=1)
    linf_cap: float | None = Field(None, gt=0, le=1)
    tol: float = Field(1e-2, gt=0, lt=1)


@OBJECTIVES.register("iwd_at")
class IWDAT(Objective):
    """IWD adversarial training (see the module docstring).

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyCNN
        >>> model, x, y = TinyCNN(num_classes=3), torch.rand(4, 1, 8, 8), torch.arange(4) % 3
        >>> ctx = BatchContext(model, x, y, ThreatModel(rho=1e-3))
        >>> bool(torch.isfinite(IWDAT({"steps": 2}, ThreatModel(rho=1e-3)).loss(ctx)))
        True
    """

    name = "iwd_at"
    Params = IWDATParams
    example_params = {"steps": 2}

    def examples(self, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor, tuple[object, ...]]:
        """The IWD examples of the first ``ceil(fraction * N)`` images, their labels, their cache key.

        The key is the one the examples are cached and forwarded under in ``ctx``.
        """
        p: IWDATParams = self.params
        n = ctx.x.shape[0]
        m = max(min(2, n), math.ceil(p.fraction * n))  # BatchNorm in train mode needs 2 examples
        params = {
            "steps": p.steps,
            "step_size": p.step_size,
            "patch_size": p.patch_size,
            "stride": p.stride,
            "linf_cap": p.linf_cap,
            "tol": p.tol,
        }
        key = ("iwd_at", m, *sorted(params.items()))

        def compute() -> torch.Tensor:
            with ctx.attack_precision_scope():
                return IWDAttack(ctx.threat, params)(ctx.model, ctx.x[:m].detach(), ctx.y[:m])

        return ctx.memo(key, compute), ctx.y[:m], key

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Clean CE mixed with the IWD term."""
        p: IWDATParams = self.params
        x_iwd, y_iwd, key = self.examples(ctx)
        adv = ctx.forward(key, x_iwd)
        clean = ctx.logits(None)
        if p.loss == "kl":
            target = F.softmax(clean[: x_iwd.shape[0]], 1)
            adv_term = p.beta * F.kl_div(F.log_softmax(adv, 1), target, reduction="batchmean")
        else:
            adv_term = F.cross_entropy(adv, y_iwd)
        loss = (1 - p.clean_weight) * adv_term
        if p.clean_weight > 0:
            loss = loss + p.clean_weight * F.cross_entropy(clean, ctx.y)
        return loss
