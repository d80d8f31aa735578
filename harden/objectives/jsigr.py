"""J-SIGR: Jacobian norm + selective input gradient regularization (arXiv 2207.13036).

``L = CE(f(x), y) + (lambda_j / 2) ||J_f(x)||_F^2 + lambda_s ||(1 - M(x)) ⊙ ∇_x CE(f(x), y)||^2``

- ``||J_f(x)||_F^2``, the squared Frobenius norm of the logits' Jacobian w.r.t. the input, is
  estimated with random projections: for ``v ~ N(0, I_C)``, ``E ||vᵀ J||² = ||J||_F²`` exactly
  (unbiased); ``nproj`` projections are averaged (1 by default, as in Hoffman et al. 2019).
  Each projection costs one extra backward pass with ``create_graph=True`` (double backprop).
- ``M(x)`` is a binary mask of the ``q`` most salient pixels under a *perturbation-based*
  saliency map: occlusion (Zeiler & Fergus 2014) with square patches of ``patch`` pixels,
  saliency = drop of the true class's probability when the patch is set to 0. The mask is held
  constant (no gradient); the input gradient is penalised only *outside* the salient region,
  which keeps the model's attention on the object (the paper's interpretability claim) while
  flattening it elsewhere (its robustness claim, aimed at transferred attacks).

Our reconstruction: the paper's saliency method and its weights were not available to us in
full; the occlusion saliency, the Gaussian projections and every default below are ours and
are stated in the README.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.errors import HardenError
from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams

__all__ = ["JSIGR", "JSIGRParams", "jacobian_frobenius_sq", "occlusion_saliency", "top_q_mask"]


class JSIGRParams(ObjectiveParams):
    """Parameters of :class:`JSIGR`.

    Attributes:
        lambda_j: weight of the Jacobian term (the loss adds ``lambda_j / 2 * ||J||_F^2``).
        lambda_s: weight of the selective input-gradient term.
        nproj: random projections per batch for the Jacobian estimate.
        q: fraction of pixels in the salient mask ``M`` (left unpenalised).
        patch: occlusion patch side in pixels; None means ``ceil(min(H, W) / 4)`` (16 patches).
        fraction: share of the batch (its first examples) the two penalties are estimated on,
            with a forward of their own; 1 uses the shared clean forward of the whole batch. The
            clean CE always uses the whole batch. Below 1 the penalties cost proportionally less.
    """

    lambda_j: float = Field(0.01, ge=0)
    lambda_s: float = Field(1.0, ge=0)
    nproj: int = Field(1, ge=1, le=64)
    q: float = Field(0.2, gt=0, lt=1)
    patch: int | None = Field(None, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)


def jacobian_frobenius_sq(
    logits: torch.Tensor, x: torch.Tensor, nproj: int = 1, *, create_graph: bool = True
) -> torch.Tensor:
    """Per-example unbiased estimate of ``||∂logits/∂x||_F^2`` by Gaussian projections, ``(N,)``.

    ``x`` must require grad and ``logits`` come from it, one row per example (in eval mode;
    BatchNorm in train mode couples the examples of a batch).

    Example:
        >>> lin = nn.Linear(3, 2, bias=False)
        >>> x = torch.rand(1, 3, requires_grad=True)
        >>> est = torch.stack([jacobian_frobenius_sq(lin(x), x)[0] for _ in range(4000)]).mean()
        >>> bool(abs(est / lin.weight.pow(2).sum() - 1) < 0.1)
        True
    """
    total = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
    for _ in range(nproj):
        v = torch.randn_like(logits)
        (g,) = torch.autograd.grad((logits * v).sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + g.pow(2).flatten(1).sum(1)
    return total / nproj


@torch.no_grad()
def occlusion_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: int) -> torch.Tensor:
    """Occlusion saliency, ``(N, 1, H, W)``: drop of ``p(y|x)`` when each patch is zeroed.

    Runs the model in eval mode (its modes are restored) without gradients; one forward per
    patch position, batched.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> occlusion_saliency(net, torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 0]), 2).shape
        torch.Size([3, 1, 4, 4])
    """
    n, _, h, w = x.shape
    modes = save_modes(model)
    model.eval()
    try:
        base = F.softmax(model(x), 1).gather(1, y[:, None])[:, 0]
        sal = torch.zeros(n, 1, h, w, device=x.device, dtype=x.dtype)
        for top in range(0, h, patch):
            for left in range(0, w, patch):
                occluded = x.clone()
                occluded[:, :, top : top + patch, left : left + patch] = 0.0
                p = F.softmax(model(occluded), 1).gather(1, y[:, None])[:, 0]
                sal[:, :, top : top + patch, left : left + patch] = (base - p).view(n, 1, 1, 1)
    finally:
        restore_modes(model, modes)
    return sal


def top_q_mask(saliency: torch.Tensor, q: float) -> torch.Tensor:
    """1 on the ``ceil(q * H * W)`` most salient pixels of each example, 0 elsewhere (ties by order).

    Example:
        >>> s = torch.tensor([[[[0.1, 0.9], [0.5, 0.2]]]])
        >>> top_q_mask(s, 0.5).flatten().tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    flat = saliency.flatten(1)
    k = max(1, math.ceil(q * flat.shape[1]))
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return mask.view_as(saliency)


@OBJECTIVES.register("jsigr")
class JSIGR(Objective):
    """Jacobian norm + selective input-gradient regularization (see the module docstring).

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyCNN
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> ctx = BatchContext(TinyCNN(num_classes=3), x, y, ThreatModel(), clean_input_grad=True)
        >>> bool(torch.isfinite(JSIGR({}, ThreatModel()).loss(ctx)))
        True
    """

    name = "jsigr"
    Params = JSIGRParams

    def __init__(self, params: Any, threat: Any) -> None:
        super().__init__(params, threat)
        #: the whole batch's clean input must require grad only when the penalties use it
        self.needs_input_grad = self.params.fraction == 1.0

    def _subset(self, ctx: BatchContext) -> int:
        n = ctx.x.shape[0]
        return n if self.params.fraction == 1.0 else max(min(2, n), math.ceil(self.params.fraction * n))

    def mask(self, ctx: BatchContext) -> torch.Tensor:
        """The constant salient-region mask ``M(x)`` of the penalised examples (once per batch)."""
        p: JSIGRParams = self.params
        m = self._subset(ctx)
        x = ctx.x[:m].detach()
        patch = p.patch if p.patch is not None else math.ceil(min(x.shape[-2:]) / 4)

        def compute() -> torch.Tensor:
            return top_q_mask(occlusion_saliency(ctx.model, x, ctx.y[:m], patch), p.q)

        return ctx.memo(("jsigr-mask", m, patch, p.q), compute)

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """CE + Jacobian term + selective input-gradient term."""
        p: JSIGRParams = self.params
        logits = ctx.logits(None)
        ce_each = F.cross_entropy(logits, ctx.y, reduction="none")
        loss = ce_each.mean()
        if p.lambda_j == 0 and p.lambda_s == 0:
            return loss
        m = self._subset(ctx)
        if m == ctx.x.shape[0]:
            if not ctx.x.requires_grad:
                raise HardenError(
                    "expected a context with clean_input_grad=True for jsigr (the trainer sets it), got one without"
                )
            x_in, out, ce_in = ctx.x, logits, ce_each
        else:
            key = ("jsigr-subset", m)
            x_in = ctx.memo(key, lambda: ctx.x[:m].detach().requires_grad_(True))
            out = ctx.forward(key, x_in)
            ce_in = F.cross_entropy(out, ctx.y[:m], reduction="none")
        if p.lambda_j > 0:
            loss = loss + p.lambda_j / 2 * jacobian_frobenius_sq(out, x_in, p.nproj).mean()
        if p.lambda_s > 0:
            (g,) = torch.autograd.grad(ce_in.sum(), x_in, create_graph=True, retain_graph=True)
            outside = 1.0 - self.mask(ctx)
            loss = loss + p.lambda_s * (outside * g).pow(2).flatten(1).sum(1).mean()
        return loss
