"""FGSM (Goodfellow et al. 2015).

One step of size eps along the loss gradient's sign (linf) or its normalized direction (l2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.base import ATTACKS, Attack, EOTParams, input_grad, normalize_grad

__all__ = ["FGSM", "FGSMParams"]


class FGSMParams(EOTParams):
    """Parameters of :class:`FGSM`.

    Attributes:
        eot: forward/backward passes averaged into the gradient (EOT, Athalye et al. 2018), for
            models with a random forward pass; 1: one pass.
    """


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast gradient (sign) method: ``x + eps * normalize(grad_x CE(f(x), y))``.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
        >>> FGSM(ThreatModel(eps=0.05))(TinyMLP(num_classes=2), x, y).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "fgsm"
    Params = FGSMParams
    example_params = {}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One gradient step of size eps."""
        p: FGSMParams = self.params
        _, grad = input_grad(model, x, lambda logits: F.cross_entropy(logits, y, reduction="none"), p.eot)
        return x + self.threat.eps * normalize_grad(grad, self.threat.norm)
