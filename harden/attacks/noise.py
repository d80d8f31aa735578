"""Random noise: the weakest attack, and a sanity reference (white-box must beat it)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackParams, project
from harden.batches import predictions

__all__ = ["GaussianNoise", "NoiseParams"]


class NoiseParams(AttackParams):
    """Parameters of :class:`GaussianNoise`.

    Attributes:
        samples: noise draws per example; an example is fooled if any draw fools it.
        sigma: std of the Gaussian for linf (None: eps); for l2 each draw is rescaled to norm eps.
    """

    samples: int = Field(10, ge=1, le=10_000)
    sigma: float | None = Field(None, gt=0)


@ATTACKS.register("noise")
class GaussianNoise(Attack):
    """Worst of ``samples`` Gaussian draws, projected onto the threat model's ball.

    For linf, ``x + N(0, sigma^2)`` clipped to the ball; for l2, a Gaussian direction scaled to
    norm eps. Uses no gradients (black-box), so it is also a check: a white-box attack that does
    worse than noise points at gradient masking.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 0])
        >>> GaussianNoise(ThreatModel(eps=0.1), {"samples": 2})(TinyMLP(num_classes=2), x, y).shape
        torch.Size([3, 1, 8, 8])
    """

    name = "noise"
    Params = NoiseParams
    example_params = {"samples": 3}
    white_box = False

    @torch.no_grad()
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Keep, per example, the first draw that fools the model (else the last draw)."""
        p: NoiseParams = self.params
        norm, eps = self.threat.norm, self.threat.eps
        out = x.clone()
        todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(p.samples):
            idx = todo.nonzero().flatten()
            if idx.numel() == 0:
                break
            noise = torch.randn_like(x[idx])
            if norm == "linf":
                noise = noise * (p.sigma if p.sigma is not None else eps)
            else:
                noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * eps
            cand = project(x[idx] + noise, x[idx], norm, eps)
            out[idx] = cand
            fooled = predictions(model(cand)) != y[idx]  # non-finite logits fool it too
            todo[idx[fooled]] = False
        return out
