"""The MI objective's estimators and losses (Zhou et al., ICML 2022; the authors' code, MIAT).

An estimator scores how much a model output ``z = f(v)`` tells about an image input ``u``. As
in the authors' code it has a *local* branch on ``u`` (two stride-2 convolutions and a 1x1
residual block with LayerNorm, a ``dim``-channel feature map with ``P`` locations) and a
*global* branch on the logits (a residual MLP with LayerNorm, a ``dim`` vector). The score of a
pair at location ``p`` is ``s(i, j, p) = <g(z_i), l(u_j)[p]> / sqrt(dim)``, and the per-example
Donsker-Varadhan estimate over the batch is::

    I_i = mean_p [ s(i, i, p) - log mean_{j != i} exp s(i, j, p) ]

the other examples' images giving the product of the marginals. Differences from the authors'
code, each stated: no BatchNorm in the estimators (an example's estimate would depend on the
batch it sits in), the ``1/sqrt(dim)`` scale, and the negatives exclude ``j = i`` exactly (the
code multiplies the diagonal by 0 and so adds ``exp 0`` to the negatives' sum).

``Lcos(a, b) = |1 - cos(a, b)|`` and ``|cos(a, b)|`` compare two *vectors of per-example
estimates* over a set of selected examples (the cosine runs along the batch axis), never two
feature vectors.

Stage 1 (the authors' ``train_MI_estimator.py``) trains the estimators on a frozen model with a
discriminative objective. With ``C`` the examples the model gets right on ``x``, ``W`` those of
``C`` the attack fools and ``R`` those it does not (decided by the argmax of the logits):

- natural estimator ``E_n``, ``u = x``: on ``W`` push the vectors ``I_n(x, f(x))`` and
  ``I_n(x, f(x~))`` apart (``5 |cos|``), on ``R`` pull them together (``5 |1 - cos|``), and
  maximise ``I_n(x, f(x))`` on each (sum over the set / ``|C|``); ``loss = L_W + 0.5 L_R``;
- adversarial estimator ``E_a``, ``u = x~ - x``: on ``W`` push ``I_a(u, f(x~))`` and
  ``I_a(u, f(x))`` apart (``5 |cos|``) and maximise ``I_a(u, f(x~))`` (mean over ``W``); on
  ``R`` pull them together (``8 |1 - cos|``) and *lower* ``I_a(u, f(x~))`` (``0.1 x`` mean over
  ``R``); ``loss = L_W + 0.5 L_R``;
- with ``C`` empty, each estimator maximises its plain MI (``I_n(x, f(x))``, ``I_a(u, f(x~))``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MIEstimator", "adversarial_estimator_loss", "cos_along_batch", "natural_estimator_loss"]

#: weights of the stage-1 objective, from the authors' ``train_MI_estimator.py``
SEPARATE = 5.0  # |cos| (apart) and |1 - cos| (together) terms of E_n, and E_a's apart term
ADV_TOGETHER = 8.0  # E_a's |1 - cos| term on R
ADV_LOWER = 0.1  # E_a's push-down of I_a(u, f(x~)) on R
R_WEIGHT = 0.5  # L_R's weight beside L_W


class _Residual1x1(nn.Module):
    """``LayerNorm(nonlinear(h) + shortcut(h))`` over channels: the code's 1x1 block, without BatchNorm."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.nonlinear = nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU(), nn.Linear(n_out, n_out))
        self.shortcut = nn.Linear(n_in, n_out, bias=False)
        self.norm = nn.LayerNorm(n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., n_in) -> (..., n_out)
        return self.norm(self.nonlinear(h) + self.shortcut(h))


class MIEstimator(nn.Module):
    """Local image branch and global logits branch; per-example Donsker-Varadhan MI estimates.

    Args:
        in_chans: channels of the image input ``u``.
        num_classes: logits of the model.
        dim: feature dimension of both branches.

    Example:
        >>> est = MIEstimator(in_chans=1, num_classes=3, dim=8)
        >>> est.mi(torch.rand(5, 1, 8, 8), torch.randn(5, 3)).shape
        torch.Size([5])
    """

    def __init__(self, in_chans: int, num_classes: int, dim: int = 64) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_chans, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.ReLU(),
        )
        self.local_head = _Residual1x1(64, dim)
        self.global_head = _Residual1x1(num_classes, dim)
        self.dim = dim

    def local_features(self, u: torch.Tensor) -> torch.Tensor:
        """``l(u)``: ``(N, P, dim)``, one feature vector per location of the image input."""
        h = self.convs(u)
        return self.local_head(h.flatten(2).transpose(1, 2))

    def global_features(self, logits: torch.Tensor) -> torch.Tensor:
        """``g(z)``: ``(N, dim)``, the logits' representation."""
        return self.global_head(logits)

    def scores(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``s(i, j, p)`` for every output ``i``, image ``j`` and location ``p``: ``(N, N, P)``."""
        g, loc = self.global_features(logits), self.local_features(u)
        return torch.einsum("id,jpd->ijp", g, loc) / math.sqrt(self.dim)

    def mi(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-example Donsker-Varadhan estimates ``I_i``, ``(N,)`` (zeros for a batch of one: no negatives).

        The zeros of a batch of one keep the autograd graph (a step on them is a no-op, not an error).
        """
        n = u.shape[0]
        s = self.scores(u, logits)
        if n < 2:
            return s.sum((1, 2)) * 0.0
        eye = torch.eye(n, dtype=torch.bool, device=s.device)
        positive = s.diagonal(dim1=0, dim2=1).T  # (N, P)
        negatives = s.masked_fill(eye[:, :, None], float("-inf"))
        log_mean = torch.logsumexp(negatives, dim=1) - math.log(n - 1)  # (N, P)
        return (positive - log_mean).mean(dim=1)

    def forward(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`mi`."""
        return self.mi(u, logits)


def cos_along_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two vectors of per-example estimates (1-D, over the selected examples).

    Example:
        >>> c = float(cos_along_batch(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])))
        >>> abs(c - 1.0) <= 4 * torch.finfo(torch.float32).eps   # parallel: 1 up to float32 rounding
        True
    """
    return F.cosine_similarity(a, b, dim=0)


def natural_estimator_loss(
    est: MIEstimator, x: torch.Tensor, ln: torch.Tensor, la: torch.Tensor, right: torch.Tensor, fooled: torch.Tensor
) -> torch.Tensor:
    """Stage-1 loss of the natural estimator (module docstring); ``ln``/``la`` detached logits.

    Args:
        est: the natural estimator.
        x: clean images.
        ln: logits of ``x`` (no gradient to the model).
        la: logits of ``x~`` (no gradient to the model).
        right: ``C``, examples the model gets right on ``x``.
        fooled: examples the attack fools (wrong on ``x~``).
    """
    i_nat = est.mi(x, ln)
    if not bool(right.any()):
        return -i_nat.mean()
    i_adv = est.mi(x, la)
    n_right = right.sum()
    total = i_nat.new_zeros(())
    for chosen, weight, apart in ((right & fooled, 1.0, True), (right & ~fooled, R_WEIGHT, False)):
        if bool(chosen.any()):
            c = cos_along_batch(i_nat[chosen], i_adv[chosen])
            separation = c.abs() if apart else (1 - c).abs()
            total = total + weight * (SEPARATE * separation - i_nat[chosen].sum() / n_right)
    return total


def adversarial_estimator_loss(
    est: MIEstimator, noise: torch.Tensor, ln: torch.Tensor, la: torch.Tensor, right: torch.Tensor, fooled: torch.Tensor
) -> torch.Tensor:
    """Stage-1 loss of the adversarial estimator (module docstring), ``noise = x~ - x``."""
    i_adv = est.mi(noise, la)
    if not bool(right.any()):
        return -i_adv.mean()
    i_nat = est.mi(noise, ln)
    total = i_adv.new_zeros(())
    wrong = right & fooled
    if bool(wrong.any()):
        c = cos_along_batch(i_adv[wrong], i_nat[wrong])
        total = total + SEPARATE * c.abs() - i_adv[wrong].mean()
    kept = right & ~fooled
    if bool(kept.any()):
        c = cos_along_batch(i_nat[kept], i_adv[kept])
        total = total + R_WEIGHT * (ADV_TOGETHER * (1 - c).abs() + ADV_LOWER * i_adv[kept].mean())
    return total
