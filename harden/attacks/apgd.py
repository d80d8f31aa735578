"""APGD-CE and APGD-T (Croce & Hein, ICML 2020): PGD with momentum and an adaptive step size.

Our implementation of Auto-PGD from "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (arXiv 2003.01690), the white-box half of
AutoAttack. Per example and per run:

* Start from a random point on the surface of the eps ball, clipped to [0, 1] (linf: uniform
  noise rescaled to linf norm eps; l2: Gaussian noise rescaled to l2 norm eps), as the
  reference code does.
* Step size ``eta = 2 * eps``. The first step is plain projected ascent; later steps use
  momentum ``alpha = 0.75``: ``z = P(x_k + eta * d(g_k))``,
  ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))`` with ``d = sign`` (linf)
  or ``g / ||g||_2`` (l2), and ``P`` the projection onto the ball, then onto [0, 1].
* Checkpoints ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (100 steps: 22, 41, 57, 70, 80, 87, 93, 99).
  At a checkpoint the step size is halved and the iterate restarts from the best-loss point
  when (1) fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last checkpoint raised
  the loss, or (2) the step size was not halved at the last checkpoint and the best loss has
  not improved since.
* The best-loss point and, separately, the first misclassifying point are kept; the first
  misclassifying point is returned when there is one, else the best-loss point.

Examples the model already misclassifies on the clean input are returned unchanged; each
further restart (and, for APGD-T, each target class) attacks only the examples not yet fooled.
Everything is vectorised over the batch, with one forward and one backward pass per step; the
batch is compacted to the still-robust examples every few steps and at checkpoints (the only
host syncs of a run), so a weak model costs a fraction of the full 100 steps.

Where the reference code (github.com/fra31/auto-attack) differs from the paper, we follow the
paper: condition (1) compares with ``f(x_0)`` in the first window (the reference compares the
first step's loss with 0) and uses a strict ``<``; condition (2) may fire at the first
checkpoint; after a restart from the best point, the next window's first comparison is with
the best loss; checkpoints follow the ceil rule (identical to the reference at 100 steps).
Beyond both: the first (not the last) misclassifying iterate is returned, a still-robust
example gets its best-loss point (the reference returns the clean input), and APGD-T with
fewer than 4 classes uses the targeted margin loss (see
:func:`harden.attacks.apgd_t.targeted_dlr_loss`). APGD-T lives in :mod:`harden.attacks.apgd_t`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, EOTParams, loss_grad, normalize_grad, project
from harden.batches import predictions

__all__ = [
    "APGD",
    "APGDCE",
    "APGDParams",
    "apgd_checkpoints",
    "ce_loss",
]

#: momentum of every step after the first (alpha in the paper)
MOMENTUM = 0.75
#: drop the examples already fooled from the batch every this many steps (and at checkpoints)
COMPACT_EVERY = 5


class APGDParams(EOTParams):
    """Parameters of :class:`APGDCE`.

    Attributes:
        steps: iterations per run (the reference uses 100).
        restarts: runs from fresh random starts; later runs attack only the examples not yet
            fooled.
        rho: a checkpoint halves the step size when fewer than this fraction of the steps since
            the previous checkpoint increased the loss.
        eot: forward/backward passes averaged into each step's loss and gradient (EOT, Athalye
            et al. 2018), for models with a random forward pass; 1: one pass.
    """

    steps: int = Field(100, ge=1, le=100_000)
    restarts: int = Field(1, ge=1, le=1000)
    rho: float = Field(0.75, gt=0, le=1)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations after which APGD checks its step size: ``ceil(p_j * steps)``, below ``steps``.

    Computed in integer hundredths, so that e.g. ``0.22 + 0.19`` is exactly 0.41. Duplicate
    checkpoints (very few steps) are dropped.

    Example:
        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
        >>> apgd_checkpoints(10)
        [3, 5, 6, 7, 8, 9]
    """
    out: list[int] = []
    p_prev, p = 0, 22
    while (w := -(-p * steps // 100)) < steps:
        if not out or w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example cross-entropy with the label (``target`` is ignored)."""
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class _State:
    """Per-example state of the examples still under attack in one run (first dim = batch)."""

    idx: torch.Tensor  # positions in the run's batch
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None
    lo: torch.Tensor | None  # linf: the box of the ball intersected with [0, 1]
    hi: torch.Tensor | None
    x_adv: torch.Tensor
    x_old: torch.Tensor
    grad: torch.Tensor
    x_best: torch.Tensor
    grad_best: torch.Tensor
    loss_best: torch.Tensor
    loss_prev: torch.Tensor
    x_first: torch.Tensor  # first misclassifying iterate (meaningful where fooled)
    fooled: torch.Tensor
    step: torch.Tensor
    n_incr: torch.Tensor  # steps since the last checkpoint that raised the loss
    reduced_last: torch.Tensor  # step size halved at the last checkpoint
    loss_best_last: torch.Tensor  # best loss at the last checkpoint

    def select(self, keep: torch.Tensor) -> _State:
        """The state of the examples at positions ``keep``."""
        values: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = None if v is None else v[keep]
        return _State(**values)

    def record(self, loss: torch.Tensor, wrong: torch.Tensor) -> None:
        """Take in the loss and misclassification of the new iterate: first fooling point, increases, best."""
        self.x_first = torch.where(_bcast(wrong & ~self.fooled, self.x), self.x_adv, self.x_first)
        self.fooled = self.fooled | wrong
        self.n_incr = self.n_incr + (loss > self.loss_prev).to(self.n_incr.dtype)
        self.loss_prev = loss
        better = loss > self.loss_best
        self.x_best = torch.where(_bcast(better, self.x), self.x_adv, self.x_best)
        self.grad_best = torch.where(_bcast(better, self.x), self.grad, self.grad_best)
        self.loss_best = torch.where(better, loss, self.loss_best)

    def checkpoint(self, window: int, rho: float) -> None:
        """Halve the step and restart from the best point where conditions (1) or (2) hold."""
        reduce = (self.n_incr < rho * window) | (~self.reduced_last & (self.loss_best <= self.loss_best_last))
        self.step = torch.where(reduce, self.step / 2, self.step)
        self.x_adv = torch.where(_bcast(reduce, self.x), self.x_best, self.x_adv)
        self.grad = torch.where(_bcast(reduce, self.x), self.grad_best, self.grad)
        self.loss_prev = torch.where(reduce, self.loss_best, self.loss_prev)
        self.reduced_last, self.loss_best_last = reduce, self.loss_best
        self.n_incr = torch.zeros_like(self.n_incr)

    def flush(self, adv: torch.Tensor, fooled: torch.Tensor, loss: torch.Tensor) -> None:
        """Write the run's results of these examples into the run's ``(adv, fooled, loss)``."""
        adv[self.idx] = torch.where(_bcast(self.fooled, self.x), self.x_first, self.x_best)
        fooled[self.idx] = self.fooled
        loss[self.idx] = self.loss_best


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-example ``(N,)`` tensor so that it broadcasts against ``like``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Best:
    """Per example of a call: the returned point, whether it fools, and its run's best loss."""

    out: torch.Tensor
    fooled: torch.Tensor
    loss: torch.Tensor

    @staticmethod
    def start(x: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor) -> _Best:
        """The clean batch; examples misclassified already count as fooled (NaN logits: no answer)."""
        fooled = predictions(clean_logits) != y
        return _Best(x.clone(), fooled, torch.full(y.shape, float("-inf"), device=x.device))

    def take(self, todo: torch.Tensor, adv: torch.Tensor, fooled: torch.Tensor, loss: torch.Tensor) -> None:
        """Keep a run's point where it fools or beats the best loss so far."""
        take = fooled | (loss > self.loss[todo])
        self.out[todo] = torch.where(_bcast(take, adv), adv, self.out[todo])
        self.loss[todo] = torch.where(take, loss, self.loss[todo])
        self.fooled[todo] = fooled


class APGD(Attack):
    """Shared machinery of :class:`APGDCE` and :class:`APGDT` (not registered itself)."""

    Params = APGDParams

    def loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """The per-example loss the attack maximises (cross-entropy here)."""
        return ce_loss(logits, y, target)

    def _targets(self, clean_logits: torch.Tensor) -> list[torch.Tensor | None]:
        """One entry per sequence of runs: the target class per example, or None (untargeted)."""
        return [None]

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run ``restarts`` runs (per target class), each on the examples not fooled so far."""
        p: APGDParams = self.params
        clean_logits = self._clean_logits(model, x)
        best = _Best.start(x, y, clean_logits)
        targets = self._targets(clean_logits)
        total = len(targets) * p.restarts
        for k, target in enumerate(targets):
            if not self._runs(model, x, y, target, p.steps, p.restarts, best):
                break
            self.tick((k + 1) * p.restarts / total)
        return best.out

    def _clean_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The logits of the clean batch (EOT: their mean over ``eot`` passes)."""
        eot = self.params.eot
        with torch.no_grad():
            logits = model(x)
            for _ in range(eot - 1):
                logits = logits + model(x)
        return logits / eot if eot > 1 else logits

    def _runs(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        steps: int,
        restarts: int,
        best: _Best,
    ) -> bool:
        """``restarts`` runs of ``steps`` steps, each on the examples not fooled yet; False once none is left."""
        for _ in range(restarts):
            todo = (~best.fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                return False
            adv, run_fooled, run_loss = self._run(
                model, x[todo], y[todo], None if target is None else target[todo], steps
            )
            best.take(todo, adv, run_fooled, run_loss)
        return True

    def _forward_backward(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss, its input gradient and whether ``x_adv`` is misclassified (means over ``eot`` passes)."""
        logits, loss, grad = loss_grad(model, x_adv, lambda z: self.loss(z, y, target), self.params.eot)
        return loss, grad, predictions(logits) != y

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run of ``steps`` steps; returns the adversarial points, whether each fooled, and the best loss."""
        p: APGDParams = self.params
        s = self._start(model, x, y, target)
        res_adv, res_fooled, res_loss = s.x_adv.clone(), s.fooled.clone(), s.loss_best.clone()
        checkpoints = apgd_checkpoints(steps)
        last_ckpt = 0
        for i in range(steps):
            s.x_old, s.x_adv = s.x_adv, self._step(s, MOMENTUM if i > 0 else 1.0)
            loss, s.grad, wrong = self._forward_backward(model, s.x_adv, s.y, s.target)
            s.record(loss, wrong)
            if checkpoints and i + 1 == checkpoints[0]:
                checkpoints.pop(0)
                window, last_ckpt = i + 1 - last_ckpt, i + 1
                s.checkpoint(window, p.rho)
            elif (i + 1) % COMPACT_EVERY:
                continue
            keep = (~s.fooled).nonzero().squeeze(1)  # the only host sync of the loop
            if keep.numel() < s.idx.numel():
                s.flush(res_adv, res_fooled, res_loss)
                if keep.numel() == 0:
                    return res_adv, res_fooled, res_loss
                s = s.select(keep)
        s.flush(res_adv, res_fooled, res_loss)
        return res_adv, res_fooled, res_loss

    def _start(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> _State:
        """The state at a random start on the surface of the eps ball (clipped to [0, 1]), step size ``2 eps``."""
        norm, eps = self.threat.norm, self.threat.eps
        n = x.shape[0]
        if norm == "linf":
            t = torch.rand_like(x) * 2 - 1
            delta = t * (eps / _bcast(t.flatten(1).abs().amax(dim=1).clamp_min(1e-12), t))
        else:
            t = torch.randn_like(x)
            delta = t * (eps / _bcast(t.flatten(1).norm(dim=1) + 1e-12, t))
        x_adv = (x + delta).clamp(0.0, 1.0)
        lo, hi = ((x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)) if norm == "linf" else (None, None)
        loss, grad, wrong = self._forward_backward(model, x_adv, y, target)
        return _State(
            idx=torch.arange(n, device=x.device),
            x=x,
            y=y,
            target=target,
            lo=lo,
            hi=hi,
            x_adv=x_adv,
            x_old=x_adv,
            grad=grad,
            x_best=x_adv,
            grad_best=grad,
            loss_best=loss,
            loss_prev=loss,
            x_first=x_adv,
            fooled=wrong,
            step=torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype),
            n_incr=torch.zeros(n, device=x.device, dtype=x.dtype),
            reduced_last=torch.zeros(n, device=x.device, dtype=torch.bool),
            loss_best_last=loss,
        )

    def _step(self, s: _State, a: float) -> torch.Tensor:
        """The next iterate: projected ascent ``z``, then momentum ``a`` (projected onto the ball and [0, 1])."""
        step = _bcast(s.step, s.x)
        if s.lo is not None and s.hi is not None:  # linf
            z = torch.clamp(s.x_adv + step * s.grad.sign(), s.lo, s.hi)
            return torch.clamp(s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_old), s.lo, s.hi)
        eps = self.threat.eps
        z = project(s.x_adv + step * normalize_grad(s.grad, "l2"), s.x, "l2", eps)
        return project(s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_old), s.x, "l2", eps)


@ATTACKS.register("apgd_ce")
class APGDCE(APGD):
    """APGD on the cross-entropy loss (AutoAttack's ``apgd-ce``), in the linf or l2 ball.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        >>> attack = APGDCE(ThreatModel(norm="linf", eps=0.1), {"steps": 20})
        >>> adv = attack(TinyMLP(num_classes=3), x, y)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6), adv.shape
        (True, torch.Size([8, 1, 8, 8]))
    """

    name = "apgd_ce"
    Params = APGDParams
    example_params = {"steps": 5}
