"""J-SIGR: Jacobian norm + selective input gradient regularization (arXiv 2207.13036).

``L = CE(f(x), y) + (lambda_j / 2) ||J_f(x)||_F^2 + lambda_s ||(1 - M(x)) ⊙ ∇_x CE(f(x), y)||^2``

- ``||J_f(x)||_F^2``, the squared Frobenius norm of the logits' Jacobian w.r.t. the input, is
  estimated with random projections: for ``v ~ N(0, I_C)``, ``E ||vᵀ J||² = ||J||_F²`` exactly
  (unbiased); ``nproj`` projections are averaged (1 by default, as in Hoffman et al. 2019).
  Each projection costs one extra backward pass with ``create_graph=True`` (double backprop).
- ``M(x)`` is a binary mask of the most salient pixels under a *perturbation-based* saliency
  map: occlusion (Zeiler & Fergus 2014) with square patches of ``patch`` pixels (default
  ``ceil(min(H, W) / 7)``: 49 cells on 28x28), saliency = drop of the true class's logit
  margin when the patch is set to 0 (probabilities saturate on a confident model). The mask keeps every pixel whose saliency reaches the
  ``q`` quantile's value, so a cell tied at the threshold is kept whole (never split by pixel
  order), and never a pixel of saliency <= 0 (occluding it changed nothing).
  It is held constant (no gradient); the input gradient is penalised only *outside* the salient
  region, which keeps the model's attention on the object (the paper's interpretability claim)
  while flattening it elsewhere (its robustness claim, aimed at transferred attacks).
- Both penalties are computed on a forward of their own in **eval mode**: BatchNorm normalises
  with its running statistics, so each example's Jacobian and input gradient are its own (in
  train mode the batch statistics couple the examples and ``d f(x_i) / d x_j`` is not 0).
- ``selective: match`` (an option, not the paper) replaces the masked term by saliency matching:
  ``lambda_s || g / ||g|| - s / ||s|| ||^2`` per example, ``g = |∇_x CE|`` summed over channels and
  ``s`` the occlusion saliency clipped at 0: the input gradient is pulled toward the
  perturbation-based saliency instead of being cut outside its top region.

Our reconstruction: the paper's saliency method and its weights were not available to us in
full; the occlusion saliency, the Gaussian projections and every default below are ours and
are stated in the README.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams

__all__ = ["JSIGR", "JSIGRParams", "jacobian_frobenius_sq", "occlusion_saliency", "saliency_matching", "top_q_mask"]


class JSIGRParams(ObjectiveParams):
    """Parameters of :class:`JSIGR`.

    Attributes:
        lambda_j: weight of the Jacobian term (the loss adds ``lambda_j / 2 * ||J||_F^2``).
        lambda_s: weight of the selective input-gradient term.
        nproj: random projections per batch for the Jacobian estimate.
        q: fraction of pixels in the salient mask ``M`` (left unpenalised; whole cells at the
            threshold, never pixels whose occlusion changed nothing).
        patch: occlusion patch side in pixels; None means ``ceil(min(H, W) / 7)`` (49 cells).
        fraction: share of the batch (its first examples) the two penalties are estimated on,
            with an eval-mode forward of their own. The clean CE always uses the whole batch.
            Below 1 the penalties cost proportionally less.
        selective: ``mask`` (the paper: the input gradient outside ``M``), ``match`` (the
            normalised input gradient pulled toward the normalised saliency map; not the paper)
            or ``none`` (the whole input gradient: plain input-gradient regularisation, a baseline).
    """

    lambda_j: float = Field(0.01, ge=0)
    lambda_s: float = Field(1.0, ge=0)
    nproj: int = Field(1, ge=1, le=64)
    q: float = Field(0.2, gt=0, lt=1)
    patch: int | None = Field(None, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    selective: Literal["mask", "match", "none"] = "mask"


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


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per example."""
    true = logits.gather(1, y[:, None])[:, 0]
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)


@torch.no_grad()
def occlusion_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: int) -> torch.Tensor:
    """Occlusion saliency, ``(N, 1, H, W)``: drop of the logit margin of ``y`` when each patch is zeroed.

    The margin ``z_y - max_{j != y} z_j`` does not saturate: on a confident model ``p(y|x)``, and
    even ``log p(y|x)`` in float32, round to 1.0 and 0.0 whatever one patch does (a margin above
    about 17), while the margin still moves.

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
        base = _margin(model(x), y)
        sal = torch.zeros(n, 1, h, w, device=x.device, dtype=x.dtype)
        for top in range(0, h, patch):
            for left in range(0, w, patch):
                occluded = x.clone()
                occluded[:, :, top : top + patch, left : left + patch] = 0.0
                p = _margin(model(occluded), y)
                sal[:, :, top : top + patch, left : left + patch] = (base - p).view(n, 1, 1, 1)
    finally:
        restore_modes(model, modes)
    return sal


def top_q_mask(saliency: torch.Tensor, q: float) -> torch.Tensor:
    """1 on every pixel at least as salient as the ``ceil(q * H * W)``-th most salient one, 0 elsewhere.

    Ties at the threshold are all kept (a tied occlusion cell stays whole), so the mask never
    depends on pixel order. A pixel whose saliency is not above 0 is never salient (occluding it
    changed nothing, e.g. a black background occluded with black): when fewer than that many
    pixels are above 0, the mask is those pixels only.

    Example:
        >>> s = torch.tensor([[[[0.1, 0.9], [0.5, 0.2]]]])
        >>> top_q_mask(s, 0.5).flatten().tolist()
        [0.0, 1.0, 1.0, 0.0]
        >>> top_q_mask(torch.tensor([[[[0.3, 0.9], [0.3, 0.3]]]]), 0.5).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    flat = saliency.flatten(1)
    k = max(1, math.ceil(q * flat.shape[1]))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    return ((flat >= threshold) & (flat > 0)).to(flat.dtype).view_as(saliency)


def saliency_matching(grad: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Per example ``|| g / ||g|| - s / ||s|| ||^2``, ``g = |grad|`` summed over channels, ``s = relu(saliency)``.

    Example:
        >>> g = torch.tensor([[[[0.0, 2.0]]]]); s = torch.tensor([[[[0.0, 1.0]]]])
        >>> saliency_matching(g, s).tolist()
        [0.0]
    """
    g = grad.abs().sum(1).flatten(1)
    s = saliency.clamp_min(0).sum(1).flatten(1)
    return (F.normalize(g, dim=1, eps=1e-12) - F.normalize(s, dim=1, eps=1e-12)).pow(2).sum(1)


@OBJECTIVES.register("jsigr")
class JSIGR(Objective):
    """Jacobian norm + selective input-gradient regularization (see the module docstring).

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyCNN
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> ctx = BatchContext(TinyCNN(num_classes=3), x, y, ThreatModel())
        >>> bool(torch.isfinite(JSIGR({}, ThreatModel()).loss(ctx)))
        True
    """

    name = "jsigr"
    Params = JSIGRParams
    example_params = {"patch": 4}

    def _subset(self, ctx: BatchContext) -> int:
        n = ctx.x.shape[0]
        return n if self.params.fraction == 1.0 else max(1, math.ceil(self.params.fraction * n))

    def saliency(self, ctx: BatchContext) -> torch.Tensor:
        """The occlusion saliency map of the penalised examples (once per batch, no gradient)."""
        p: JSIGRParams = self.params
        m = self._subset(ctx)
        x = ctx.x[:m].detach()
        patch = p.patch if p.patch is not None else math.ceil(min(x.shape[-2:]) / 7)
        return ctx.memo(("jsigr-saliency", m, patch), lambda: occlusion_saliency(ctx.model, x, ctx.y[:m], patch))

    def mask(self, ctx: BatchContext) -> torch.Tensor:
        """The constant salient-region mask ``M(x)`` of the penalised examples (once per batch)."""
        m = self._subset(ctx)
        return ctx.memo(("jsigr-mask", m, self.params.q), lambda: top_q_mask(self.saliency(ctx), self.params.q))

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """CE + Jacobian term + selective input-gradient term (the penalties on an eval-mode forward)."""
        p: JSIGRParams = self.params
        loss = F.cross_entropy(ctx.logits(None), ctx.y)
        if p.lambda_j == 0 and p.lambda_s == 0:
            return loss
        m = self._subset(ctx)
        key = ("jsigr-penalised", m)
        x_in = ctx.memo(key, lambda: ctx.x[:m].detach().requires_grad_(True))
        out = ctx.forward_eval(key, x_in)
        if p.lambda_j > 0:
            loss = loss + p.lambda_j / 2 * jacobian_frobenius_sq(out, x_in, p.nproj).mean()
        if p.lambda_s > 0:
            ce_in = F.cross_entropy(out, ctx.y[:m], reduction="sum")
            (g,) = torch.autograd.grad(ce_in, x_in, create_graph=True, retain_graph=True)
            if p.selective == "mask":
                term = ((1.0 - self.mask(ctx)) * g).pow(2).flatten(1).sum(1)
            elif p.selective == "match":
                term = saliency_matching(g, self.saliency(ctx))
            else:  # plain input-gradient regularisation (a baseline)
                term = g.pow(2).flatten(1).sum(1)
            loss = loss + p.lambda_s * term.mean()
        return loss
