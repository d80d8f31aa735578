"""MI: natural vs adversarial mutual information (Zhou et al., ICML 2022, "MIAT"/NAMID).

Two estimators (:mod:`harden.objectives.mi_estimator`) give per-example mutual-information
estimates: the *natural* one ``I_n(u, f(v))`` with ``u = x``, the *adversarial* one
``I_a(u, f(v))`` with ``u = x~ - x`` (the noise). ``x~`` is the PGD view of the batch (shared
with ``pgd_at`` when the step counts match). With ``sel`` the examples right on ``x`` and wrong
on ``x~`` (argmax of the logits), the model minimises, as the authors' ``train_MIAT.py``::

    ce_weight * CE(f(x~), y)
      + alpha * [ Lcos(I_n(x, f(x))_sel, I_n(x, f(x~))_sel)
                + Lcos(I_a(x~ - x, f(x~))_sel, I_a(x~ - x, f(x))_sel)
                + lam * mean_sel(I_a(x~ - x, f(x~)) - I_n(x, f(x~))) ]

``Lcos(a, b) = |1 - cos(a, b)|`` between the two *vectors of per-example estimates* over
``sel`` (cosine along the batch axis). The adversarial output should carry the natural image's
information as the natural output does, and the noise's as little as the natural output does.

Two stages, as in the paper: the estimators are first trained with the authors' discriminative
stage-1 objective (``train_MI_estimator.py``; see :mod:`~harden.objectives.mi_estimator`) for
``warmup_epochs`` passes over the training data on the *frozen* model (eval mode, no model
update), right before epoch ``start_epoch``; from then on the model trains with the MI term and
the estimators stay frozen (``estimators: frozen``, the paper). Before ``start_epoch`` the
objective contributes its CE term only, so a mix (``pgd_at`` first) can adversarially train the
model that the estimators then learn from, as the paper's pre-trained model.

Deviations, documented: the paper warms the estimators up for 25 epochs on a separately
adversarially trained model; ours run ``warmup_epochs`` (default 1) inside the same
``harden.fit``. ``estimators: alternating`` (not the paper) keeps training them with the stage-1
objective after every model step. ``lam`` defaults to the paper's 0.1; the authors' released
``train_MIAT.py`` has that term commented out (``lam: 0`` reproduces the code). The authors
pick ``sel`` by ``softmax(dim=0)`` before the argmax, across the batch: a bug we do not copy.

Distributed training (``torchrun``): the estimators are not wrapped in DDP; rank 0's initial
weights are broadcast in :meth:`MI.setup`, and before every estimator step their gradients are
averaged over ranks (:func:`harden.distributed.average_gradients`), so they stay identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm

from harden.attacks.base import restore_modes, save_modes
from harden.batches import predictions
from harden.distributed import average_gradients, broadcast_parameters
from harden.errors import CheckpointError, HardenError
from harden.objectives.base import OBJECTIVES, BatchContext, Batches, Objective, ObjectiveParams, View, pgd_view
from harden.objectives.mi_estimator import (
    MIEstimator,
    adversarial_estimator_loss,
    cos_along_batch,
    natural_estimator_loss,
)

__all__ = ["MI", "MIEstimator", "MIParams"]


class MIParams(ObjectiveParams):
    """Parameters of :class:`MI`.

    Attributes:
        alpha: weight of the MI terms (5 in the paper and the code).
        lam: weight of ``mean_sel(I_a - I_n)`` inside them (0.1 in the paper; the code has 0).
        ce_weight: weight of ``CE(f(x~), y)`` (set 0 when mixing with ``pgd_at``, which has it).
        steps: PGD steps of the adversarial view (equal to ``pgd_at``'s to share it).
        step_size: PGD step; None means ``2.5 * eps / steps``.
        dim: estimator feature dimension.
        lr: the estimators' Adam learning rate.
        start_epoch: the first epoch (0-based) trained with the MI terms; the estimators warm up
            right before it.
        warmup_epochs: stage-1 passes over the training data on the frozen model.
        estimators: ``frozen`` after the warm-up (the paper) or ``alternating`` (a stage-1 step
            after every model step; not the paper).
    """

    alpha: float = Field(5.0, ge=0)
    lam: float = Field(0.1, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    steps: int = Field(7, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0)
    dim: int = Field(64, ge=2, le=4096)
    lr: float = Field(1e-3, gt=0)
    start_epoch: int = Field(0, ge=0)
    warmup_epochs: int = Field(1, ge=0, le=1000)
    estimators: Literal["frozen", "alternating"] = "frozen"

    @model_validator(mode="after")
    def _trained_somehow(self) -> MIParams:
        if self.warmup_epochs == 0 and self.estimators == "frozen":
            raise ValueError(
                "expected warmup_epochs >= 1 or estimators 'alternating', got neither: frozen estimators that were "
                "never trained measure nothing"
            )
        return self


def selection(ln: torch.Tensor, la: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(right, fooled)``: the clean prediction is ``y``; the adversarial one is not.

    Predictions are :func:`harden.batches.predictions`: a row of logits with a NaN or infinity is
    no answer, so it is never right and, adversarial, always fooled.

    Example:
        >>> right, fooled = selection(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [0.0, 1.0]]),
        ...                           torch.tensor([0, 0]))
        >>> right.tolist(), fooled.tolist()
        ([True, False], [True, True])
    """
    return predictions(ln) == y, predictions(la) != y


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
    example_params = {"steps": 2}

    def __init__(self, params: Any, threat: Any) -> None:
        super().__init__(params, threat)
        self.natural: MIEstimator | None = None
        self.adversarial: MIEstimator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch = 0  # the epoch being trained (set by begin_epoch)
        self.warmed_up = False  # stage 1 done (saved in checkpoints)

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

    @property
    def active(self) -> bool:
        """Whether the MI terms are on for the epoch being trained."""
        return self.epoch >= self.params.start_epoch

    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """``ce_weight * CE(f(x~), y) + alpha * [...]`` (see the module docstring)."""
        p: MIParams = self.params
        nat, adv_est, _ = self._estimators()
        view = self._view()
        x_adv = ctx.view(view)
        la = ctx.logits(view)
        loss = p.ce_weight * F.cross_entropy(la, ctx.y) if p.ce_weight > 0 else la.sum() * 0.0
        if p.alpha == 0 or not self.active:
            return loss
        ln = ctx.logits(None)
        with torch.no_grad():
            right, fooled = selection(ln, la, ctx.y)
            sel = right & fooled
        if int(sel.sum()) < 2:  # a cosine of one-element vectors is +-1 with no gradient: nothing to learn
            return loss
        x = ctx.x.detach()
        noise = (x_adv - x).detach()
        for est in (nat, adv_est):
            est.requires_grad_(False)  # the model's loss does not train the estimators
        try:
            # the negatives of each estimate come from the whole batch; the terms compare sel
            n_nat, n_adv = nat.mi(x, ln), nat.mi(x, la)
            a_adv, a_nat = adv_est.mi(noise, la), adv_est.mi(noise, ln)
        finally:
            for est in (nat, adv_est):
                est.requires_grad_(True)
        term = (1 - cos_along_batch(n_nat[sel], n_adv[sel])).abs() + (1 - cos_along_batch(a_adv[sel], a_nat[sel])).abs()
        term = term + p.lam * (a_adv[sel] - n_adv[sel]).mean()
        return loss + p.alpha * term

    def estimator_step(
        self, x: torch.Tensor, x_adv: torch.Tensor, ln: torch.Tensor, la: torch.Tensor, y: torch.Tensor
    ) -> float:
        """One stage-1 step of both estimators on a batch (logits detached); returns the loss."""
        nat, adv_est, optimizer = self._estimators()
        ln, la, x = ln.detach().float(), la.detach().float(), x.detach()
        right, fooled = selection(ln, la, y)
        optimizer.zero_grad(set_to_none=True)
        loss = natural_estimator_loss(nat, x, ln, la, right, fooled)
        loss = loss + adversarial_estimator_loss(adv_est, (x_adv - x).detach(), ln, la, right, fooled)
        loss.backward()
        average_gradients([*nat.parameters(), *adv_est.parameters()])  # no-op unless distributed
        optimizer.step()
        return float(loss.detach())

    def begin_epoch(self, epoch: int, model: nn.Module, batches: Batches, progress: bool = False) -> None:
        """Record the epoch; right before ``start_epoch``, warm the estimators up on the frozen model."""
        self.epoch = epoch
        if epoch < self.params.start_epoch or self.warmed_up:  # also after a resume past start_epoch
            return
        modes = save_modes(model)
        model.eval()
        try:
            for k in range(self.params.warmup_epochs):
                bar = tqdm(
                    batches(),
                    desc=f"MI estimators {k + 1}/{self.params.warmup_epochs}",
                    disable=not progress,
                    leave=False,
                )
                for x, y in bar:
                    ctx = BatchContext(model, x, y, self.threat)
                    x_adv = ctx.view(self._view())
                    with torch.no_grad():
                        ln, la = model(x), model(x_adv)
                    bar.set_postfix(loss=f"{self.estimator_step(x, x_adv, ln, la, y):.4f}")
                bar.close()
        finally:
            restore_modes(model, modes)
        self.warmed_up = True

    def after_step(self, ctx: BatchContext) -> None:
        """With ``estimators: alternating``, a stage-1 estimator step on this batch once the terms are on."""
        if self.params.estimators != "alternating" or not self.active:
            return
        view = self._view()
        self.estimator_step(ctx.x, ctx.view(view), ctx.logits(None), ctx.logits(view), ctx.y)

    def state_dict(self) -> dict[str, Any]:
        """Both estimators, their optimizer, and whether the warm-up is done."""
        nat, adv_est, optimizer = self._estimators()
        return {
            "natural": nat.state_dict(),
            "adversarial": adv_est.state_dict(),
            "optimizer": optimizer.state_dict(),
            "warmed_up": torch.tensor(self.warmed_up),
        }

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
        # checkpoints written before the two stages have no flag: their estimators get the warm-up
        self.warmed_up = bool(state.get("warmed_up", False))
