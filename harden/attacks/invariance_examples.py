"""Label-changing invariance examples (Tramèr et al. 2020, used by the OT-metric paper).

A *sensitivity* adversarial example keeps the true label and changes the model's answer; an
*invariance* example changes the true label and keeps the model's answer. A model trained to be
flat inside the eps ball can be excessively invariant: it keeps answering ``y`` for an image
that, within the same ball, has become another digit.

Construction (the automated l_inf procedure of Tramèr et al., "Fundamental Tradeoffs between
Invariance and Sensitivity to Adversarial Perturbations", ICML 2020, reconstructed here):

1. For a test image ``x`` of label ``y``, try every transform ``g`` of a rotation/shift grid
   (default ±30° in 7 steps, ±3 px in 5 steps per axis) and find, over a pool of labelled
   images (the policy's training split, or the attacked batch when no pool is known), the image
   ``p`` of a class ``t != y`` nearest in l2 to ``g(x)``.
2. Align it back: ``x_src = g⁻¹(p)`` (the exact inverse affine map, bilinear resampling).
3. Move ``x`` toward it as far as the budget allows: ``x' = Proj_{B(x, eps) ∩ [0,1]}(x_src)``,
   with ``eps`` the threat model's, or the attack's own l_inf radius ``params.eps`` (Tramèr et
   al. used 0.3-0.4 on MNIST: a smaller ball rarely holds another digit).

Scoring, as the paper does: the example's label is the *new* class ``t``, the aligned
neighbour's (in the paper, human labellers confirmed it; harden has no labellers, so ``t`` is
the construction's intended label: the figure measures agreement with it, and should be read
with that in mind, especially at small eps where ``x'`` may still look like a ``y``).
:meth:`InvarianceExamples.score` returns, per example, whether the model answers ``t``;
:meth:`InvarianceExamples.score_source` whether it keeps answering ``y``, the class of the image
the example was built from (excessive invariance, if the example is really a ``t``).

The construction does not use the model, so the examples are the same for every model: compare
models on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackEnv, AttackParams, project, restore_modes, save_modes
from harden.batches import predictions as predicted_classes
from harden.errors import DataError
from harden.policy import ThreatModel

__all__ = ["InvarianceExamples", "InvarianceExamplesParams", "LabelChange", "affine_theta", "apply_affine"]


class InvarianceExamplesParams(AttackParams):
    """Parameters of :class:`InvarianceExamples`.

    Attributes:
        max_angle: largest rotation tried when aligning, degrees.
        angles: rotation grid points.
        max_shift: largest shift per axis tried when aligning, pixels.
        shifts: shift grid points per axis.
        pool_size: training images searched for the nearest other-class neighbour.
        eps: the examples' own l_inf radius around the input (None: the threat model's norm
            and eps).
    """

    max_angle: float = Field(30.0, ge=0, le=180)
    angles: int = Field(7, ge=1, le=361)
    max_shift: float = Field(3.0, ge=0)
    shifts: int = Field(5, ge=1, le=41)
    pool_size: int = Field(2000, ge=2)
    eps: float | None = Field(None, gt=0, le=1)


class LabelChange(NamedTuple):
    """Label-changing examples of a batch.

    Attributes:
        x: the examples, inside the threat model around the inputs.
        label: the label each example is meant to have: the new class, the aligned neighbour's.
        valid: an example could be built (the pool holds another class).
        distance: l2 distance between the transformed input and its aligned neighbour.
    """

    x: torch.Tensor
    label: torch.Tensor
    valid: torch.Tensor
    distance: torch.Tensor


def affine_theta(angle_deg: float, dx: float, dy: float, height: int, width: int) -> torch.Tensor:
    """The 3x3 sampling matrix (normalized coordinates) of a rotation about the centre + shift.

    ``apply_affine(x, theta)`` with this matrix equals
    :func:`harden.attacks.invariance.rotate_shift`; ``torch.linalg.inv(theta)`` undoes it.

    Example:
        >>> theta = affine_theta(90.0, 1.0, 0.0, 4, 4)
        >>> torch.allclose(theta @ torch.linalg.inv(theta), torch.eye(3, dtype=torch.float64))
        True
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor(
        [[c, -s * height / width, -2 * dx / width], [s * width / height, c, -2 * dy / height], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (NCHW) with per-example 3x3 sampling matrices ``theta`` (N, 3, 3) or one (3, 3)."""
    t = theta.to(dtype=x.dtype, device=x.device)
    t = t.expand(x.shape[0], 3, 3) if t.dim() == 2 else t
    grid = F.affine_grid(t[:, :2, :], list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _span(m: float, k: int) -> list[float]:
    return [0.0] if k == 1 else [-m + 2 * m * i / (k - 1) for i in range(k)]


@ATTACKS.register("invariance_examples")
class InvarianceExamples(Attack):
    """Label-changing invariance examples, scored against the new label (see the module).

    ``__call__`` returns the examples inside the policy's threat model (its final projection
    enforces the threat's norm and eps, whatever ``params.eps``); :meth:`examples`, :meth:`score`
    and :meth:`score_source` use ``params.eps`` when set. :meth:`score` says per example whether
    the model gives the *new* label. Without :meth:`prepare` (or with a pool of one class), the attacked batch
    itself is the pool.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> atk = InvarianceExamples(ThreatModel(eps=0.3), {"angles": 3, "shifts": 1})
        >>> right, counted = atk.score(TinyMLP(num_classes=2), x, y)
        >>> right.shape, bool(counted.all())
        (torch.Size([4]), True)
    """

    name = "invariance_examples"
    Params = InvarianceExamplesParams
    bounded = True
    white_box = False
    changes_label = True
    uses_training_split = True
    example_params = {"angles": 3, "shifts": 3}

    def __init__(self, threat: ThreatModel, params: BaseModel | Mapping[str, Any] | None = None) -> None:
        super().__init__(threat, params)
        self.pool: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self, env: AttackEnv) -> None:
        """Take the first ``pool_size`` images of the policy's training split as the pool."""
        bundle = env.bundle
        if bundle is None:
            return
        from harden.data import eval_batches

        xs, ys = [], []
        for xb, yb in eval_batches(bundle.train, 500, self.params.pool_size):
            xs.append(xb.float())
            ys.append(torch.as_tensor(yb).long())
        self.pool = (torch.cat(xs), torch.cat(ys))

    def grid(self) -> list[tuple[float, float, float]]:
        """The ``(angle, dx, dy)`` transforms tried when aligning."""
        p: InvarianceExamplesParams = self.params
        return [
            (a, dx, dy)
            for a in _span(p.max_angle, p.angles)
            for dx in _span(p.max_shift, p.shifts)
            for dy in _span(p.max_shift, p.shifts)
        ]

    @torch.no_grad()
    def sources(self, x: torch.Tensor, y: torch.Tensor) -> LabelChange:
        """Aligned nearest other-class neighbours ``x_src`` (not yet projected) of each input."""
        if self.pool is not None:
            px, py = self.pool[0].to(x.device), self.pool[1].to(x.device)
        else:
            px, py = x, y
        if px.shape[1:] != x.shape[1:]:
            raise DataError(f"expected pool images shaped like x {tuple(x.shape[1:])}, got {tuple(px.shape[1:])}")
        n, (_, h, w) = x.shape[0], x.shape[1:]
        flat_pool = px.flatten(1)
        pool_sq = (flat_pool * flat_pool).sum(1)
        best_d = torch.full((n,), math.inf, device=x.device)
        best_j = torch.zeros(n, dtype=torch.long, device=x.device)
        best_g = torch.zeros(n, dtype=torch.long, device=x.device)
        other = y[:, None] != py[None, :]
        grid = self.grid()
        for gi, (angle, dx, dy) in enumerate(grid):
            gx = apply_affine(x, affine_theta(angle, dx, dy, h, w)).flatten(1)
            d2 = (gx * gx).sum(1, keepdim=True) + pool_sq[None, :] - 2 * gx @ flat_pool.T
            d2 = d2.masked_fill(~other, math.inf)
            d, j = d2.min(1)
            better = d < best_d
            best_d = torch.where(better, d, best_d)
            best_j = torch.where(better, j, best_j)
            best_g = torch.where(better, torch.full_like(best_g, gi), best_g)
        valid = torch.isfinite(best_d)
        chosen = [grid[int(g)] for g in best_g.tolist()]
        inv = torch.stack([torch.linalg.inv(affine_theta(a, dx, dy, h, w)) for a, dx, dy in chosen])
        x_src = apply_affine(px[best_j], inv).clamp(0.0, 1.0)
        x_src = torch.where(valid.view(-1, 1, 1, 1), x_src, x)
        label = torch.where(valid, py[best_j], y)
        return LabelChange(x_src, label, valid, best_d.clamp_min(0).sqrt())

    def examples(self, x: torch.Tensor, y: torch.Tensor) -> LabelChange:
        """The label-changing examples of ``(x, y)``, inside the threat model (or ``params.eps``'s l_inf ball)."""
        src = self.sources(x, y)
        eps = self.params.eps
        norm, radius = ("linf", eps) if eps is not None else (self.threat.norm, self.threat.eps)
        return src._replace(x=project(src.x, x, norm, radius))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The examples (the model is not used: the construction is model-independent)."""
        return self.sources(x, y).x

    @torch.no_grad()
    def predictions(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, LabelChange]:
        """The model's answers (eval mode, modes restored) on the examples of ``(x, y)``, and the examples."""
        self._check_inputs(model, x, y)
        ex = self.examples(x, y)
        modes = save_modes(model)
        model.eval()
        try:
            pred = predicted_classes(model(ex.x))  # -1 (never a label) for non-finite logits
        finally:
            restore_modes(model, modes)
        return pred, ex

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the model answers the new label; the example counts (could be built)."""
        pred, ex = self.predictions(model, x, y)
        return (pred == ex.label) & ex.valid, ex.valid

    def score_source(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the model still answers ``y``, the source image's class; the example counts."""
        pred, ex = self.predictions(model, x, y)
        return (pred == y) & ex.valid, ex.valid
