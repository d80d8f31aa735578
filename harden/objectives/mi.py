"""MI: natural vs adversarial mutual information (Zhou et al., ICML 2022, "MIAT"/NAMID).

Two estimator networks score how much a model output tells about an input:

- the *natural* estimator ``E_n`` pairs an image ``x`` with logits,
- the *adversarial* estimator ``E_a`` pairs the adversarial noise ``x~ - x`` with logits.

Each has a small conv branch on its image input (``φ``) and a 1x1 branch (an MLP) on the
logits (``ψ``); their score is ``T(u, z) = <φ(u), ψ(z)>`` and the per-example mutual-information
lower bound is the Donsker-Varadhan/InfoNCE form over the batch,
``I_i = T(u_i, z_i) - log mean_j exp T(u_i, z_j)``, the other examples' outputs giving the
product of marginals.

The estimators are trained (their own Adam optimizer) to maximise ``I`` on
``(x, f(x))`` for ``E_n`` and on ``(x~ - x, f(x~))`` for ``E_a``. The model minimises

``CE(f(x~), y) + alpha * mean_sel[ Lcos(ψ_n(f(x~)), ψ_n(f(x))) + Lcos(ψ_a(f(x~)), ψ_a(f(x)))
+ lambda * (I_a(x~ - x, f(x~)) - I_n(x, f(x~))) ]``

with ``Lcos(a, b) = |1 - cos(a, b)|`` and ``sel`` the examples correct on ``x`` and wrong on
``x~`` (the paper's sample selection): the adversarial output should carry the natural image's
information and not the noise's. ``x~`` is the PGD view of the batch (shared with ``pgd_at``
when the step counts match).

Deviation, documented: the paper pre-trains the estimators and then trains the model; we train
them in alternation (one estimator step after every model step, on the same batch), so one
``harden.fit`` does both. The estimator architecture and every default are ours.

Distributed training (``torchrun``): the estimators are not wrapped in DDP (they are called
through :meth:`MIEstimator.mi` / :meth:`MIEstimator.features`, not ``forward``, and step outside
the model's optimizer). Instead rank 0's initial weights are broadcast in :meth:`MI.setup`, and
before every estimator step their gradients are averaged over ranks in one all-reduce
(:func:`harden.distributed.average_gradients`): with equal gradients, equal weights and the same
Adam state, they stay identical on every rank, as DDP keeps the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.distributed import average_gradients, broadcast_parameters
from harden.errors import CheckpointError, HardenError
from harden.objectives.base import OBJECTIVES, BatchContext, Objective, ObjectiveParams, View, pgd_view

__all__ = ["MI", "MIEstimator", "MIParams"]


class MIParams(ObjectiveParams):
    """Parameters of :class:`MI`.

    Attributes:
        alpha: weight of the MI term (5 in the paper).
        lam: weight of ``I_a - I_n`` inside it (lambda, 0.1 in the paper).
        ce_weight: weight of ``CE(f(x~), y)`` (set 0 when mixing with ``pgd_at``, which has it).
        steps: PGD steps of the adversarial view (equal to ``pgd_at``'s to share it).
        step_size: PGD step; None means ``2.5 * eps / steps``.
        dim: estimator feature dimension.
        lr: the estimators' Adam learning rate.
    """

    alpha: float = Field(5.0, ge=0)
    lam: float = Field(0.1, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    steps: int = Field(7, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0)
    dim: int = Field(64, ge=2, le=4096)
    lr: float = Field(1e-3, gt=0)


class MIEstimator(nn.Module):
    """``T(u, z) = <φ(u), ψ(z)>``: conv branch on images, 1x1 branch on logits.

    Example:
        >>> est = MIEstimator(in_chans=1, num_classes=3, dim=8)
        >>> est.mi(torch.rand(5, 1, 8, 8), torch.randn(5, 3)).shape
        torch.Size([5])
    """

    def __init__(self, in_chans: int, num_classes: int, dim: int = 64) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, dim),
        )
        self.psi = nn.Sequential(nn.Linear(num_classes, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.dim = dim

    def features(self, logits: torch.Tensor) -> torch.Tensor:
        """``ψ(z)``: the logits' representation, ``(N, dim)``."""
        return self.psi(logits)

    def scores(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``T(u_i, z_j)`` for every pair, ``(N, N)``."""
        return self.phi(u) @ self.features(logits).T / math.sqrt(self.dim)

    def mi(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-example MI lower bound ``T_ii - log mean_j exp T_ij``, ``(N,)``."""
        t = self.scores(u, logits)
        return t.diagonal() - (torch.logsumexp(t, dim=1) - math.log(t.shape[1]))

    def forward(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`mi`."""
        return self.mi(u, logits)


def _lcos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=1)).abs()


@OBJECTIVES.register("mi")
class MI(Objective):
    """Natural/adversarial mutual information regularization (see the module docstring).

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyCNN
        >>> model, x, y = TinyCNN(num_classes=3), torch.rand(8, 1, 8, 8), torch.arange(8) % 3
        >>> obj = MI({"steps": 2}, ThreatModel(eps=0.1))
        >>> obj.setup(model, x[:1])
        >>> bool(torch.isfinite(obj.loss(BatchContext(model, x, y, ThreatModel(eps=0.1)))))
        True
    """

    name = "mi"
    Params = MIParams

    def __init__(self, params: Any, threat: Any) -> None:
        super().__init__(params, threat)
        self.natural: MIEstimator | None = None
        self.adversarial: MIEstimator | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _view(self) -> View:
        return pgd_view(self.params.steps, self.params.step_size)

    def views(self) -> tuple[View, ...]:
        """The PGD view."""
        return (self._view(),)

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        """Build both estimators (sized from one forward of ``example``) and their optimizer."""
        modes = save_modes(model)
        model.eval()
        try:
            with torch.no_grad():
                num_classes = int(model(example[:1]).shape[1])
        finally:
            restore_modes(model, modes)
        dim, chans = self.params.dim, int(example.shape[1])
        self.natural = MIEstimator(chans, num_classes, dim).to(example.device)
        self.adversarial = MIEstimator(chans, num_classes, dim).to(example.device)
        broadcast_parameters([self.natural, self.adversarial])  # no-op unless distributed
        self.optimizer = torch.optim.Adam(
            [*self.natural.parameters(), *self.adversarial.parameters()], lr=self.params.lr
        )

    def _estimators(self) -> tuple[MIEstimator, MIEstimator, torch.optim.Optimizer]:
        if self.natural is None or self.adversarial is None or self.optimizer is None:
            raise HardenError("expected MI.setup(model, example) before use (harden.fit calls it)")
        return self.natural, self.adversarial, self.optimizer

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """``ce_weight * CE(f(x~), y) + alpha * mean_sel[...]`` (see the module docstring)."""
        p: MIParams = self.params
        nat, adv_est, _ = self._estimators()
        view = self._view()
        x_adv = ctx.view(view)
        la, ln = ctx.logits(view), ctx.logits(None)
        loss = p.ce_weight * F.cross_entropy(la, ctx.y) if p.ce_weight > 0 else la.sum() * 0.0
        with torch.no_grad():
            sel = (ln.argmax(1) == ctx.y) & (la.argmax(1) != ctx.y)
        if p.alpha == 0 or not bool(sel.any()):
            return loss
        x = ctx.x.detach()
        for est in (nat, adv_est):
            est.requires_grad_(False)  # the model's loss does not train the estimators
        try:
            i_adv = adv_est.mi(x_adv - x, la)  # noise <-> adversarial output
            i_nat = nat.mi(x, la)  # natural image <-> adversarial output
            term = (
                _lcos(nat.features(la), nat.features(ln))
                + _lcos(adv_est.features(la), adv_est.features(ln))
                + p.lam * (i_adv - i_nat)
            )
        finally:
            for est in (nat, adv_est):
                est.requires_grad_(True)
        return loss + p.alpha * term[sel].mean()

    def after_step(self, ctx: BatchContext) -> None:
        """One estimator step: maximise ``I_n(x, f(x)) + I_a(x~ - x, f(x~))`` on this batch."""
        nat, adv_est, optimizer = self._estimators()
        view = self._view()
        x = ctx.x.detach()
        noise = ctx.view(view) - x
        ln, la = ctx.logits(None).detach(), ctx.logits(view).detach()
        optimizer.zero_grad(set_to_none=True)
        objective = nat.mi(x, ln).mean() + adv_est.mi(noise, la).mean()
        (-objective).backward()
        average_gradients([*nat.parameters(), *adv_est.parameters()])  # no-op unless distributed
        optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """Both estimators and their optimizer."""
        nat, adv_est, optimizer = self._estimators()
        return {"natural": nat.state_dict(), "adversarial": adv_est.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after :meth:`setup`).

        Raises:
            CheckpointError: the state lacks the estimators (a checkpoint of another policy).
        """
        nat, adv_est, optimizer = self._estimators()
        missing = {"natural", "adversarial", "optimizer"} - set(state)
        if missing:
            raise CheckpointError(f"expected MI estimator state in the checkpoint, missing {sorted(missing)}")
        nat.load_state_dict(state["natural"])
        adv_est.load_state_dict(state["adversarial"])
        optimizer.load_state_dict(state["optimizer"])
