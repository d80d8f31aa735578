"""OT metric regularization against sensitivity and invariance attacks (arXiv 2211.02468).

Two kinds of perturbed inputs per batch:

- *sensitivity* examples: the PGD view at the policy's threat model (label kept, ``y``),
  shared with ``pgd_at``/``mi`` when the step counts match;
- *invariance* examples: label-changing edits inside the same eps ball, built as in
  Tramèr et al. 2020 (:mod:`harden.attacks.invariance_examples`) with the batch itself as the
  pool: the nearest other-class image of the batch, aligned by a rotation/shift grid, projected
  into the ball around ``x``, labelled with its source class ``t``.

Both are compared with the clean batch in embedding space (``e(·)``, the classifier's input by
default; see :mod:`harden.objectives.embedding`). The OT term transports the clean embeddings
onto the perturbed ones with the label-aware cost

``C_ij = (1 - cos(e(x_i), e(x~_j))) + gamma * [y_i != y~_j]``

(uniform weights; entropic plan by POT's log-Sinkhorn, ``reg`` explicit); the loss is
``<T, C>`` with the plan held constant (envelope gradient). The label term steers the plan to
same-label pairs, so minimising pulls each adversarial embedding to clean ones of its class and
each invariance example toward clean ones of its *new* class: against excessive invariance.

The angular hard-triplet form (from the authors' code, as we reconstruct it): anchor ``e(x_i)``,
positive its sensitivity example, negative the perturbed embedding of another label closest in
angle; ``relu(margin + d(a, p) - d(a, n))`` with ``d = 1 - cos``, plus ``norm_reg`` times the mean
squared embedding norm.

Total: ``ce_weight * CE(f(x_adv), y) + lam * L_ot + triplet_weight * L_triplet + norm_reg * ||e||^2``.
Every default is ours; the paper's full text was not available to us.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from harden.attacks.invariance_examples import InvarianceExamples, LabelChange
from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams, View, pgd_view
from harden.ot import sinkhorn_plan

__all__ = ["OTMetric", "OTMetricParams", "angular_triplet", "label_aware_cost"]


class OTMetricParams(ObjectiveParams):
    """Parameters of :class:`OTMetric`.

    Attributes:
        lam: weight of the OT term (lambda).
        gamma: label-mismatch cost added to the cosine cost.
        reg: entropic regularization of the plan (the cost lies in ``[0, 2 + gamma]``).
        ce_weight: weight of ``CE(f(x_adv), y)`` (0 when mixing with ``pgd_at``, which has it).
        triplet_weight: weight of the angular hard-triplet term.
        margin: triplet margin (in ``1 - cos`` units).
        norm_reg: weight of the mean squared embedding norm.
        invariance: include the label-changing invariance examples.
        inv_fraction: share of the batch (its first examples) turned into invariance examples
            (each costs one forward and backward more).
        angles: rotation grid points aligning invariance sources (±30°).
        shifts: shift grid points per axis aligning invariance sources (±3 px).
        steps: PGD steps of the sensitivity view (equal to ``pgd_at``'s to share it).
        step_size: PGD step; None means ``2.5 * eps / steps``.
        layer: embedding layer of a custom model (its output); None = the classifier's input.
    """

    lam: float = Field(1.0, ge=0)
    gamma: float = Field(1.0, ge=0)
    reg: float = Field(0.1, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    triplet_weight: float = Field(0.5, ge=0)
    margin: float = Field(0.05, ge=0)
    norm_reg: float = Field(1e-3, ge=0)
    invariance: bool = True
    inv_fraction: float = Field(1.0, gt=0, le=1)
    angles: int = Field(5, ge=1, le=61)
    shifts: int = Field(3, ge=1, le=13)
    steps: int = Field(7, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0)
    layer: str | None = None


def label_aware_cost(
    e_clean: torch.Tensor, e_pert: torch.Tensor, y_clean: torch.Tensor, y_pert: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``(1 - cos(e_i, e~_j)) + gamma * [y_i != y~_j]``, shape ``(n, m)``.

    Example:
        >>> e = torch.eye(2)
        >>> label_aware_cost(e, e, torch.tensor([0, 1]), torch.tensor([0, 0]), 1.0).tolist()
        [[0.0, 1.0], [2.0, 1.0]]
    """
    cos = F.normalize(e_clean, dim=1) @ F.normalize(e_pert, dim=1).T
    return (1 - cos) + gamma * (y_clean[:, None] != y_pert[None, :]).to(cos.dtype)


def angular_triplet(
    e_clean: torch.Tensor,
    e_pos: torch.Tensor,
    e_pert: torch.Tensor,
    y_clean: torch.Tensor,
    y_pert: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Mean ``relu(margin + d(a, p) - min_{n: label != y} d(a, n))`` with ``d = 1 - cos``.

    Anchors without any negative of another label contribute 0.

    Example:
        >>> a = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[1.0, 0.0]]); n = torch.tensor([[0.0, 1.0]])
        >>> float(angular_triplet(a, p, n, torch.tensor([0]), torch.tensor([1]), 0.05))
        0.0
    """
    a, p, n = F.normalize(e_clean, dim=1), F.normalize(e_pos, dim=1), F.normalize(e_pert, dim=1)
    d_pos = 1 - (a * p).sum(1)
    d_all = 1 - a @ n.T
    other = y_clean[:, None] != y_pert[None, :]
    d_neg = d_all.masked_fill(~other, float("inf")).min(1).values
    has = other.any(1)
    losses = F.relu(margin + d_pos - d_neg)
    return torch.where(has, losses, torch.zeros_like(losses)).mean()


@OBJECTIVES.register("ot_metric")
class OTMetric(Objective):
    """OT metric regularization (see the module docstring).

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.objectives.embedding import EmbeddingTap
        >>> from harden.testing import TinyCNN
        >>> model, x, y = TinyCNN(num_classes=3), torch.rand(8, 1, 8, 8), torch.arange(8) % 3
        >>> ctx = BatchContext(model, x, y, ThreatModel(eps=0.1), tap=EmbeddingTap(model))
        >>> bool(torch.isfinite(OTMetric({"steps": 2}, ThreatModel(eps=0.1)).loss(ctx)))
        True
    """

    name = "ot_metric"
    Params = OTMetricParams

    def _view(self) -> View:
        return pgd_view(self.params.steps, self.params.step_size)

    def views(self) -> tuple[View, ...]:
        """The PGD (sensitivity) view."""
        return (self._view(),)

    def embedding_layer(self) -> str | bool | None:
        """The ``layer`` parameter (None: the classifier's input)."""
        return self.params.layer

    def invariance_examples(self, ctx: BatchContext) -> LabelChange:
        """Label-changing examples of the batch's first ``inv_fraction`` (the batch is the pool)."""
        p: OTMetricParams = self.params
        n = ctx.x.shape[0]
        m = max(min(2, n), math.ceil(p.inv_fraction * n))
        attack = InvarianceExamples(ctx.threat, {"angles": p.angles, "shifts": p.shifts})
        attack.pool = (ctx.x.detach(), ctx.y)

        def compute() -> LabelChange:
            return attack.examples(ctx.x[:m].detach(), ctx.y[:m])

        return ctx.memo(("invariance_examples", m, p.angles, p.shifts), compute)

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Adversarial CE + OT term + angular triplet + embedding-norm term."""
        p: OTMetricParams = self.params
        view = self._view()
        logits_adv = ctx.logits(view)
        e_adv, e_clean = ctx.embedding(view), ctx.embedding(None)
        e_pert, y_pert = e_adv, ctx.y
        if p.invariance:
            inv = self.invariance_examples(ctx)
            if bool(inv.valid.any()):
                key = ("invariance_examples", int(inv.x.shape[0]), p.angles, p.shifts)
                ctx.forward(key, inv.x[inv.valid])
                e_pert = torch.cat([e_adv, ctx.embedding(key)])
                y_pert = torch.cat([ctx.y, inv.label[inv.valid]])
        loss = p.ce_weight * F.cross_entropy(logits_adv, ctx.y)
        if p.lam > 0:
            cost = label_aware_cost(e_clean, e_pert, ctx.y, y_pert, p.gamma)
            loss = loss + p.lam * (sinkhorn_plan(cost, p.reg) * cost).sum()
        if p.triplet_weight > 0:
            loss = loss + p.triplet_weight * angular_triplet(e_clean, e_adv, e_pert, ctx.y, y_pert, p.margin)
        if p.norm_reg > 0:
            loss = loss + p.norm_reg * torch.cat([e_clean, e_pert]).pow(2).sum(1).mean()
        return loss
