"""OT metric regularization against sensitivity and invariance attacks (arXiv 2211.02468).

Two kinds of perturbed inputs per batch:

- *sensitivity* examples: the PGD view at the policy's threat model (label kept, ``y``),
  shared with ``pgd_at``/``mi`` when the step counts match;
- *invariance* examples (Tramèr et al. 2020; :mod:`harden.attacks.invariance_examples`) with
  the batch as the pool: the nearest image of *another* class ``t`` in the batch, aligned to
  ``x`` by a rotation/shift grid, projected into an l_inf ball of their own radius ``inv_eps``
  around ``x`` (default 0.4: Tramèr et al. and the OT-metric paper use 0.3-0.4 on MNIST; the
  sensitivity eps, 0.1 there, is too small to change the class, so calling such an example
  another class would be label noise). The label it carries is a stated choice, ``inv_label``:
  ``new`` (default: ``t``, Tramèr et al.'s definition: the image has become a ``t``) or
  ``source`` (the class ``y`` of the image it was built from, as the authors' code labels its
  invariance inputs).

Both are compared with the clean batch in embedding space (``e(·)``, the classifier's input by
default; see :mod:`harden.objectives.embedding`), with ``d = 1 - cos``:

- the OT term, with marginals consistent with the labels. ``per_class`` (default): for every
  class ``c`` present among the clean and the perturbed examples, the entropic OT cost between
  the uniform distribution of the clean embeddings of class ``c`` and that of the perturbed ones
  of class ``c`` (cost ``d``), weighted by the clean examples' class frequencies: no mass moves
  between classes. ``unbalanced``: one KL-relaxed OT problem (``reg_m``) between uniform
  marginals over all of them, with cost ``d + gamma * [y_i != y~_j]`` (POT's ``ot.solve``).
  Either way the plan is POT's, ``reg`` explicit, held constant (envelope gradient ``<T, C>``);
- the angular hard-triplet term (the authors' code, ``sampler.online_mine_angular_hard``):
  anchor ``e(x_i)``, positive its sensitivity example, negative the closest (in ``d``) perturbed
  embedding of another label, *never the anchor's own invariance example* (which sits in the
  anchor's own ball); ``relu(margin + d(a, p) - d(a, n))``, weight 0.5, margin 0.05; plus
  ``norm_reg`` (1e-3) times the mean squared embedding norm.

Total: ``ce_weight * CE(f(x_adv), y) + lam * L_ot + triplet_weight * L_triplet + norm_reg * ||e||^2``.
The authors' released code (``modeling.py``) has the triplet form only; the OT term is the
paper's, in our formulation (its defaults are ours: ``lam`` 1, ``reg`` 0.1).
"""

from __future__ import annotations

import math
from typing import Literal

import ot
import torch
import torch.nn.functional as F
from pydantic import Field

from harden.attacks.invariance_examples import InvarianceExamples, LabelChange
from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams, View, pgd_view
from harden.ot import DEFAULT_MAX_ITER, DEFAULT_TOL, sinkhorn_plan
from harden.policy import ThreatModel

__all__ = ["OTMetric", "OTMetricParams", "angular_triplet", "class_ot_loss", "label_aware_cost", "unbalanced_ot_loss"]


class OTMetricParams(ObjectiveParams):
    """Parameters of :class:`OTMetric`.

    Attributes:
        lam: weight of the OT term (lambda).
        marginals: ``per_class`` (OT within each class) or ``unbalanced`` (KL-relaxed marginals).
        gamma: label-mismatch cost added to the cosine cost (``unbalanced`` only).
        reg_m: KL marginal relaxation of ``unbalanced`` (larger: closer to balanced).
        reg: entropic regularization of the plan (the cost lies in ``[0, 2 + gamma]``).
        ce_weight: weight of ``CE(f(x_adv), y)`` (0 when mixing with ``pgd_at``, which has it).
        triplet_weight: weight of the angular hard-triplet term.
        margin: triplet margin (in ``1 - cos`` units).
        norm_reg: weight of the mean squared embedding norm.
        invariance: include the label-changing invariance examples.
        inv_eps: l_inf radius of the invariance examples around ``x`` (their own, not the threat's).
        inv_label: the label an invariance example carries: ``new`` (the aligned neighbour's
            class, Tramèr et al.) or ``source`` (the class of the image it was built from).
        inv_fraction: share of the batch (its first examples) turned into invariance examples
            (each costs one forward and backward more).
        angles: rotation grid points aligning invariance sources (±30°).
        shifts: shift grid points per axis aligning invariance sources (±3 px).
        steps: PGD steps of the sensitivity view (equal to ``pgd_at``'s to share it).
        step_size: PGD step; None means ``2.5 * eps / steps``.
        layer: embedding layer of a custom model (its output); None = the classifier's input.
    """

    lam: float = Field(1.0, ge=0)
    marginals: Literal["per_class", "unbalanced"] = "per_class"
    gamma: float = Field(1.0, ge=0)
    reg_m: float = Field(1.0, gt=0)
    reg: float = Field(0.1, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    triplet_weight: float = Field(0.5, ge=0)
    margin: float = Field(0.05, ge=0)
    norm_reg: float = Field(1e-3, ge=0)
    invariance: bool = True
    inv_eps: float = Field(0.4, gt=0, le=1)
    inv_label: Literal["new", "source"] = "new"
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
    owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean ``relu(margin + d(a, p) - min_n d(a, n))`` with ``d = 1 - cos``.

    The negatives of anchor ``i`` are the perturbed embeddings of another label, except those
    built from anchor ``i`` itself (``owner[j] == i``: its own invariance example). Anchors
    without any negative contribute 0.

    Example:
        >>> a = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[1.0, 0.0]]); n = torch.tensor([[0.0, 1.0]])
        >>> float(angular_triplet(a, p, n, torch.tensor([0]), torch.tensor([1]), 0.05))
        0.0
    """
    a, p, n = F.normalize(e_clean, dim=1), F.normalize(e_pos, dim=1), F.normalize(e_pert, dim=1)
    d_pos = 1 - (a * p).sum(1)
    d_all = 1 - a @ n.T
    other = y_clean[:, None] != y_pert[None, :]
    if owner is not None:
        other = other & (owner[None, :] != torch.arange(len(y_clean), device=owner.device)[:, None])
    d_neg = d_all.masked_fill(~other, float("inf")).min(1).values
    has = other.any(1)
    losses = F.relu(margin + d_pos - d_neg)
    return torch.where(has, losses, torch.zeros_like(losses)).mean()


def class_ot_loss(
    e_clean: torch.Tensor,
    e_pert: torch.Tensor,
    y_clean: torch.Tensor,
    y_pert: torch.Tensor,
    reg: float,
    tol: float = DEFAULT_TOL,
) -> torch.Tensor:
    """``sum_c w_c <T_c, C_c>``: entropic OT within each class ``c`` seen on both sides, ``C = 1 - cos``.

    ``T_c`` is POT's plan between the uniform distributions of the class's clean and perturbed
    embeddings (held constant); ``w_c`` is the class's share of the clean examples of those
    classes. 0 when no class is on both sides.

    Example:
        >>> e = torch.eye(2)
        >>> float(class_ot_loss(e, e, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.1))
        0.0
    """
    total, mass = e_clean.new_zeros(()), 0
    for c in sorted(set(y_clean.tolist()) & set(y_pert.tolist())):
        ci, pj = y_clean == c, y_pert == c
        cost = 1 - F.normalize(e_clean[ci], dim=1) @ F.normalize(e_pert[pj], dim=1).T
        total = total + int(ci.sum()) * (sinkhorn_plan(cost, reg, tol) * cost).sum()
        mass += int(ci.sum())
    return total / max(mass, 1)


def unbalanced_ot_loss(cost: torch.Tensor, reg: float, reg_m: float, tol: float = DEFAULT_TOL) -> torch.Tensor:
    """``<T, C>`` with ``T`` POT's entropic unbalanced plan (KL marginal relaxation ``reg_m``), held constant.

    Example:
        >>> c = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
        >>> float(unbalanced_ot_loss(c, 0.05, 1.0)) < 0.01
        True
    """
    n, m = cost.shape
    a = cost.new_full((n,), 1.0 / n).detach()
    b = cost.new_full((m,), 1.0 / m).detach()
    with torch.no_grad():
        res = ot.solve(
            cost.detach(),
            a,
            b,
            reg=reg,
            unbalanced=reg_m,
            unbalanced_type="KL",
            max_iter=DEFAULT_MAX_ITER,
            tol=tol / math.sqrt(n),
            grad="detach",
        )
    return (res.plan.detach() * cost).sum()


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
    example_params = {"steps": 2}

    def _view(self) -> View:
        return pgd_view(self.params.steps, self.params.step_size)

    def views(self) -> tuple[View, ...]:
        """The PGD (sensitivity) view."""
        return (self._view(),)

    def embedding_layer(self) -> str | bool | None:
        """The ``layer`` parameter (None: the classifier's input)."""
        return self.params.layer

    def invariance_examples(self, ctx: BatchContext) -> LabelChange:
        """Label-changing examples of the batch's first ``inv_fraction`` (the batch is the pool), l_inf ``inv_eps``."""
        p: OTMetricParams = self.params
        n = ctx.x.shape[0]
        m = max(min(2, n), math.ceil(p.inv_fraction * n))
        attack = InvarianceExamples(ThreatModel(norm="linf", eps=p.inv_eps), {"angles": p.angles, "shifts": p.shifts})
        attack.pool = (ctx.x.detach(), ctx.y)

        def compute() -> LabelChange:
            return attack.examples(ctx.x[:m].detach(), ctx.y[:m])

        return ctx.memo(("invariance_examples", m, p.angles, p.shifts, p.inv_eps), compute)

    def perturbed(self, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The perturbed embeddings (sensitivity, then invariance), their labels, and the anchor each came from."""
        p: OTMetricParams = self.params
        e_pert, y_pert = ctx.embedding(self._view()), ctx.y
        owner = torch.arange(ctx.x.shape[0], device=ctx.x.device)
        if p.invariance:
            inv = self.invariance_examples(ctx)
            if bool(inv.valid.any()):
                key = ("invariance_examples", int(inv.x.shape[0]), p.angles, p.shifts, p.inv_eps)
                ctx.forward(key, inv.x[inv.valid])
                label = inv.label if p.inv_label == "new" else ctx.y[: inv.x.shape[0]]
                e_pert = torch.cat([e_pert, ctx.embedding(key)])
                y_pert = torch.cat([y_pert, label[inv.valid]])
                owner = torch.cat([owner, inv.valid.nonzero().squeeze(1)])
        return e_pert, y_pert, owner

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """Adversarial CE + OT term + angular triplet + embedding-norm term."""
        p: OTMetricParams = self.params
        view = self._view()
        logits_adv = ctx.logits(view)
        e_adv, e_clean = ctx.embedding(view), ctx.embedding(None)
        e_pert, y_pert, owner = self.perturbed(ctx)
        loss = p.ce_weight * F.cross_entropy(logits_adv, ctx.y)
        if p.lam > 0:
            if p.marginals == "per_class":
                loss = loss + p.lam * class_ot_loss(e_clean, e_pert, ctx.y, y_pert, p.reg)
            else:
                cost = label_aware_cost(e_clean, e_pert, ctx.y, y_pert, p.gamma)
                loss = loss + p.lam * unbalanced_ot_loss(cost, p.reg, p.reg_m)
        if p.triplet_weight > 0:
            triplet = angular_triplet(e_clean, e_adv, e_pert, ctx.y, y_pert, p.margin, owner)
            loss = loss + p.triplet_weight * triplet
        if p.norm_reg > 0:
            loss = loss + p.norm_reg * torch.cat([e_clean, e_pert]).pow(2).sum(1).mean()
        return loss
