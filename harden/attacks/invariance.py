"""The invariance (spatial) attack: the worst rotation and shift of a small grid.

Rotations within ±30° and shifts within ±3 px leave a digit or an object what it is, so a model
should be invariant to them; this attack finds, per example, a grid point that changes the
prediction. It is not an l_p attack (``bounded = False``): harden reports it beside the threat
model's worst case, not inside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackParams
from harden.batches import predictions

__all__ = ["Invariance", "InvarianceParams", "rotate_shift"]


class InvarianceParams(AttackParams):
    """Parameters of :class:`Invariance`.

    Attributes:
        max_angle: largest rotation, degrees (the grid spans ±max_angle).
        angles: rotation grid points (odd includes 0°).
        max_shift: largest shift along each axis, pixels.
        shifts: shift grid points per axis (odd includes 0).
    """

    max_angle: float = Field(30.0, ge=0, le=180)
    angles: int = Field(7, ge=1, le=361)
    max_shift: float = Field(3.0, ge=0)
    shifts: int = Field(3, ge=1, le=41)


def rotate_shift(x: torch.Tensor, angle_deg: float, dx: float, dy: float) -> torch.Tensor:
    """Rotate ``x`` by ``angle_deg`` about its centre and shift it by ``(dx, dy)`` pixels.

    Bilinear sampling with zero (black) padding.

    Example:
        >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 2, 2] = 1
        >>> rotate_shift(x, 0.0, 1.0, 0.0)[0, 0, 2, 3].item()
        1.0
    """
    n, _, h, w = x.shape
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor(
        [[cos, -sin * h / w, -2 * dx / w], [sin * w / h, cos, -2 * dy / h]], dtype=x.dtype, device=x.device
    ).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@ATTACKS.register("invariance")
class Invariance(Attack):
    """Worst case over a grid of rotations and shifts (Engstrom et al. 2019's grid attack).

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
        >>> Invariance(ThreatModel(), {"angles": 3, "shifts": 1})(TinyMLP(num_classes=2), x, y).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "invariance"
    Params = InvarianceParams
    example_params = {"angles": 3, "shifts": 3}
    bounded = False
    white_box = False

    def grid(self) -> list[tuple[float, float, float]]:
        """The ``(angle, dx, dy)`` grid, identity first."""
        p: InvarianceParams = self.params

        def span(m: float, k: int) -> list[float]:
            return [0.0] if k == 1 else [-m + 2 * m * i / (k - 1) for i in range(k)]

        pts = [
            (a, dx, dy)
            for a in span(p.max_angle, p.angles)
            for dx in span(p.max_shift, p.shifts)
            for dy in span(p.max_shift, p.shifts)
        ]
        return sorted(set(pts), key=lambda t: (abs(t[0]) + abs(t[1]) + abs(t[2]), t))

    @torch.no_grad()
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example, the first grid transform (smallest first) that changes the prediction."""
        out = x.clone()
        todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for angle, dx, dy in self.grid():
            idx = todo.nonzero().flatten()
            if idx.numel() == 0:
                break
            cand = rotate_shift(x[idx], angle, dx, dy)
            fooled = predictions(model(cand)) != y[idx]  # non-finite logits fool it too
            out[idx[fooled]] = cand[fooled]
            todo[idx[fooled]] = False
        return out
