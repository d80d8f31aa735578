"""IWD attack: maximise the loss inside an internal-Wasserstein-distance budget.

This is our formulation of the idea of arXiv 2103.07598 ("internal Wasserstein distance" for
adversarial attack and defence); the paper's full text was not available to us, so the
optimiser, its schedule and every default below are ours.

Problem: ``max CE(f(x'), y)`` subject to ``IWD(x, x') <= rho`` and ``x'`` in [0, 1] (and,
optionally, ``||x' - x||_inf <= linf_cap``), with IWD the debiased Sinkhorn divergence between
the k x k patch distributions of ``x`` and ``x'`` (:func:`harden.ot.iwd`). Unlike an l_p ball,
the budget allows large pixel changes that keep the image's patch statistics (moving or
re-arranging strokes, sharpening, texture-like edits), so the perturbations are larger and
more structured than PGD's.

Optimiser (per example, all in one batch): start at ``x``; for ``steps`` steps, take a signed
gradient step of ``step_size`` on the penalised objective
``CE(f(x'), y) - beta * max(0, IWD(x, x') - rho) / rho``, clip to [0, 1] (and to the l_inf
cap), and adapt the penalty weight: ``beta *= beta_up`` when the current iterate violates the
budget, ``beta *= beta_down`` otherwise (kept in ``[1e-3, 1e6]``). Every iterate (the start
included) is scored; per example the attack returns the best iterate with ``IWD <= rho``:
misclassified before correctly classified, then higher loss. Feasibility guarantee: the IWD
of the returned batch is recomputed and any example above ``rho * (1 + feasibility_tol)``
(Sinkhorn's tolerance can move a value at the boundary slightly) is replaced by ``x`` itself.
With ``restarts: 1`` (default) there is no randomness: the result is a deterministic function
of the model and the inputs. Each further restart starts from ``x`` plus uniform noise of
amplitude ``step_size`` (torch's global generator, which ``harden.verify`` seeds) and attacks
only the examples no earlier run fooled: different starts find different, more diverse examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackParams
from harden.batches import predictions
from harden.errors import PolicyError
from harden.ot import DEFAULT_MAX_ITER, DEFAULT_REG, DEFAULT_TOL, iwd, self_cost

__all__ = ["DEFAULT_RHO", "IWDAttack", "IWDParams", "IWDPerturbation", "calibrate_rho", "iwd_perturb"]

#: IWD budget used when the threat model has no ``rho``: about the IWD of uniform noise of l_inf
#: amplitude 0.2 on MNIST digits. With the default IWD settings (k=3, stride 1, reg 0.05), noise of
#: amplitude 0.1 / 0.2 / 0.3 on mnist-5k digits has a mean IWD of 5.5e-4 / 2.3e-3 / 5.2e-3.
DEFAULT_RHO = 2e-3
_BETA_MIN, _BETA_MAX = 1e-3, 1e6


def calibrate_rho(
    x: torch.Tensor,
    amplitude: float = 0.2,
    *,
    k: int | None = None,
    stride: int | None = None,
    quantile: float = 0.5,
    seed: int = 0,
) -> float:
    """An IWD budget for one patch geometry: the ``quantile`` of ``IWD(x, x + noise)`` over ``x``.

    ``rho`` has a meaning only for the geometry (patch size ``k``, ``stride``) it was measured
    with: the same edit moves overlapping and disjoint patch sets differently. This measures it
    the way :data:`DEFAULT_RHO` was: uniform noise of l_inf ``amplitude`` (clipped to [0, 1]),
    seeded, on the images ``x`` (use a few hundred training images), at the given geometry;
    set ``threat.rho`` to the result and give the ``iwd`` attack and ``iwd_at`` that geometry.

    Example:
        >>> x = torch.rand(8, 1, 12, 12)
        >>> calibrate_rho(x, 0.1, k=3, stride=2) < calibrate_rho(x, 0.3, k=3, stride=2)
        True
    """
    if not 0 < amplitude <= 1 or not 0 <= quantile <= 1:
        raise PolicyError(f"expected amplitude in (0, 1] and quantile in [0, 1], got {amplitude}, {quantile}")
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1).to(x.device) * amplitude
    with torch.no_grad():
        d = iwd(x, (x + noise).clamp(0, 1), k=k, stride=stride, tol=1e-3, max_iter=2000)
    return float(torch.quantile(d.double().cpu(), quantile))


class IWDParams(AttackParams):
    """Parameters of :class:`IWDAttack` (and, but ``restarts``, keyword arguments of :func:`iwd_perturb`).

    Attributes:
        steps: optimisation steps (default 50).
        step_size: per-pixel signed step (default 0.02).
        restarts: runs; each run after the first starts from ``x`` plus uniform noise of
            amplitude ``step_size`` and attacks only the examples not fooled yet (default 1).
        beta: initial penalty weight, in CE units per relative budget violation
            ``(IWD - rho) / rho`` (default 1.0).
        beta_up: factor applied to beta after a step whose iterate violates the budget (default 2.0).
        beta_down: factor applied to beta otherwise (default 0.9).
        linf_cap: optional l_inf bound on ``x' - x`` on top of the IWD budget (default None: none).
        feasibility_tol: relative slack of the final feasibility check (default 0.01).
        patch_size: IWD patch size k (default None: :func:`harden.ot.patches`' default, 3).
        stride: IWD patch stride (default None: 1 for images up to 32 px, ``ceil(side / 32)`` above).
        reg: Sinkhorn regularization (default :data:`harden.ot.DEFAULT_REG`, 0.05).
        tol: relative Sinkhorn tolerance (default :data:`harden.ot.DEFAULT_TOL`, 3e-3).
        max_iter: Sinkhorn iterations at most (default :data:`harden.ot.DEFAULT_MAX_ITER`, 500).
        max_elems: cost-matrix elements per Sinkhorn chunk (default None: ``2**19`` on the CPU,
            ``2**24`` elsewhere).
    """

    steps: int = Field(50, ge=1, le=100_000)
    step_size: float = Field(0.02, gt=0, le=1)
    restarts: int = Field(1, ge=1, le=1000)
    beta: float = Field(1.0, gt=0)
    beta_up: float = Field(2.0, ge=1)
    beta_down: float = Field(0.9, gt=0, le=1)
    linf_cap: float | None = Field(None, gt=0, le=1)
    feasibility_tol: float = Field(0.01, ge=0, le=1)
    patch_size: int | None = Field(None, ge=1)
    stride: int | None = Field(None, ge=1)
    reg: float = Field(DEFAULT_REG, gt=0)
    tol: float = Field(DEFAULT_TOL, gt=0, lt=1)
    max_iter: int = Field(DEFAULT_MAX_ITER, ge=1)
    max_elems: int | None = Field(None, ge=1)


class IWDPerturbation(NamedTuple):
    """Result of :func:`iwd_perturb`.

    Attributes:
        x_adv: adversarial pixels, detached, like ``x``.
        iwd: ``IWD(x, x_adv)`` per example (recomputed on the returned batch), shape ``(N,)``.
        fooled: whether the model misclassifies ``x_adv`` (as seen during the search), ``(N,)``.
    """

    x_adv: torch.Tensor
    iwd: torch.Tensor
    fooled: torch.Tensor


_DEFAULTS = IWDParams()


def iwd_perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rho: float,
    *,
    steps: int = _DEFAULTS.steps,
    step_size: float = _DEFAULTS.step_size,
    beta: float = _DEFAULTS.beta,
    beta_up: float = _DEFAULTS.beta_up,
    beta_down: float = _DEFAULTS.beta_down,
    linf_cap: float | None = _DEFAULTS.linf_cap,
    feasibility_tol: float = _DEFAULTS.feasibility_tol,
    patch_size: int | None = _DEFAULTS.patch_size,
    stride: int | None = _DEFAULTS.stride,
    reg: float = _DEFAULTS.reg,
    tol: float = _DEFAULTS.tol,
    max_iter: int = _DEFAULTS.max_iter,
    max_elems: int | None = _DEFAULTS.max_elems,
    start: torch.Tensor | None = None,
) -> IWDPerturbation:
    """The IWD attack's search (see the module docstring); usable by training objectives.

    The model is used as it is (its train/eval mode is not changed: put it in eval mode
    first, or BatchNorm statistics will move); only gradients w.r.t. the input are taken, so
    parameter ``.grad`` fields are left untouched. Arguments are :class:`IWDParams`' fields.

    Args:
        model: classifier returning logits.
        x: clean pixels in [0, 1], NCHW.
        y: integer labels, ``(N,)``.
        rho: IWD budget (> 0).
        steps: see :class:`IWDParams` (all keyword arguments have its defaults).
        step_size: see :class:`IWDParams`.
        beta: see :class:`IWDParams`.
        beta_up: see :class:`IWDParams`.
        beta_down: see :class:`IWDParams`.
        linf_cap: see :class:`IWDParams`.
        feasibility_tol: see :class:`IWDParams`.
        patch_size: see :class:`IWDParams`.
        stride: see :class:`IWDParams`.
        reg: see :class:`IWDParams`.
        tol: see :class:`IWDParams`.
        max_iter: see :class:`IWDParams`.
        max_elems: see :class:`IWDParams`.
        start: the first iterate (default ``x``), e.g. a random start in the budget.

    Returns:
        :class:`IWDPerturbation` with ``iwd <= rho * (1 + feasibility_tol)`` for every example.

    Example:
        >>> from harden.testing import TinyMLP
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> res = iwd_perturb(TinyMLP(num_classes=2).eval(), x, y, rho=1e-3, steps=5)
        >>> bool((res.iwd <= 1e-3 * 1.01).all()), res.x_adv.shape
        (True, torch.Size([4, 1, 8, 8]))
    """
    if not rho > 0:
        raise PolicyError(f"expected an IWD budget rho > 0, got {rho}")
    x = x.detach()
    dist = _distance_to(x, k=patch_size, stride=stride, reg=reg, tol=tol, max_iter=max_iter, max_elems=max_elems)
    settings = _Settings(rho, steps, step_size, beta, beta_up, beta_down, linf_cap)
    best, clean_mis = _search(model, x, y, dist, start, settings)
    return _feasible(best, x, clean_mis, dist, rho, feasibility_tol)


_Dist = Callable[[torch.Tensor], torch.Tensor]


class _Settings(NamedTuple):
    """The search's settings: the budget, the steps (how many, their size), the penalty weights and the cap."""

    rho: float
    steps: int
    step_size: float
    beta: float
    beta_up: float
    beta_down: float
    linf_cap: float | None


@dataclass
class _Best:
    """Per example, the best feasible iterate so far: its pixels, whether it fools, its loss."""

    x: torch.Tensor
    mis: torch.Tensor
    loss: torch.Tensor

    @classmethod
    def empty(cls, x: torch.Tensor) -> _Best:
        """Nothing found yet: ``x`` itself, not fooling, loss -inf."""
        n = x.shape[0]
        mis = torch.zeros(n, dtype=torch.bool, device=x.device)
        return cls(x.clone(), mis, torch.full((n,), -float("inf"), dtype=x.dtype, device=x.device))

    def update(self, x_adv: torch.Tensor, mis: torch.Tensor, ce: torch.Tensor, d: torch.Tensor, rho: float) -> None:
        """Take ``x_adv`` where it is within budget and better: fooling first, then a higher loss."""
        better = (d <= rho) & ((mis & ~self.mis) | ((mis == self.mis) & (ce > self.loss)))
        self.x[better] = x_adv.detach()[better]
        self.mis = torch.where(better, mis, self.mis)
        self.loss = torch.where(better, ce.detach(), self.loss)


def _distance_to(
    x: torch.Tensor, *, k: int | None, stride: int | None, reg: float, tol: float, max_iter: int, max_elems: int | None
) -> _Dist:
    """``z -> IWD(x, z)`` with the given IWD settings, the self-cost of ``x`` computed once."""
    x_self = self_cost(x, k=k, stride=stride, reg=reg, tol=tol, max_iter=max_iter, max_elems=max_elems)

    def dist(z: torch.Tensor) -> torch.Tensor:
        return iwd(x, z, k=k, stride=stride, reg=reg, tol=tol, max_iter=max_iter, max_elems=max_elems, x_self=x_self)

    return dist


def _first_iterate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor | None, linf_cap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first iterate (``x``, or ``start`` within the cap) and, given a start, whether ``x`` is misclassified."""
    clean_mis = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if start is not None:
        with torch.no_grad():
            clean_mis = predictions(model(x)) != y
    x_adv = x.clone() if start is None else start.detach().clone()
    if start is not None and linf_cap is not None:
        x_adv = (x + (x_adv - x).clamp(-linf_cap, linf_cap)).clamp(0.0, 1.0)
    return x_adv, clean_mis


def _evaluate(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, dist: _Dist, grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-example cross-entropy and IWD of ``x_adv`` (with a graph to ``x_adv`` when ``grad``)."""
    with torch.set_grad_enabled(grad):
        x_adv.requires_grad_(grad)
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y, reduction="none")
        d = dist(x_adv)
    return logits, ce, d


def _ascent_step(
    x: torch.Tensor, x_adv: torch.Tensor, ce: torch.Tensor, d: torch.Tensor, betas: torch.Tensor, s: _Settings
) -> tuple[torch.Tensor, torch.Tensor]:
    """One signed-gradient step on the penalised objective; returns the next iterate and penalty weights."""
    rho = s.rho
    loss = ce - betas * torch.relu(d - rho) / rho
    (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    with torch.no_grad():
        betas = torch.where(d > rho, betas * s.beta_up, betas * s.beta_down).clamp(_BETA_MIN, _BETA_MAX)
        x_adv = x_adv.detach() + s.step_size * grad.sign()
        if s.linf_cap is not None:
            x_adv = x + (x_adv - x).clamp(-s.linf_cap, s.linf_cap)
        x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv, betas


def _search(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dist: _Dist, start: torch.Tensor | None, s: _Settings
) -> tuple[_Best, torch.Tensor]:
    """Score the first iterate and one after each of ``s.steps`` steps; returns the best and ``x``'s misclassification."""
    best = _Best.empty(x)
    x_adv, clean_mis = _first_iterate(model, x, y, start, s.linf_cap)
    betas = torch.full((x.shape[0],), float(s.beta), dtype=x.dtype, device=x.device)
    for t in range(s.steps + 1):
        last = t == s.steps
        logits, ce, d = _evaluate(model, x_adv, y, dist, not last)
        with torch.no_grad():
            mis = predictions(logits) != y
            if t == 0 and start is None:
                clean_mis = mis
            best.update(x_adv, mis, ce, d, s.rho)
        if last:
            break
        x_adv, betas = _ascent_step(x, x_adv, ce, d, betas, s)
    return best, clean_mis


def _feasible(
    best: _Best, x: torch.Tensor, clean_mis: torch.Tensor, dist: _Dist, rho: float, feasibility_tol: float
) -> IWDPerturbation:
    """The result with its IWD recomputed; an example over ``rho * (1 + feasibility_tol)`` is replaced by ``x``."""
    with torch.no_grad():
        best_mis = torch.where(best.loss == -float("inf"), clean_mis, best.mis)  # never feasible: x itself
        final = dist(best.x)
        over = final > rho * (1 + feasibility_tol)
        if bool(over.any()):
            best.x[over] = x[over]
            best_mis = torch.where(over, clean_mis, best_mis)
            final = dist(best.x)
    return IWDPerturbation(best.x, final, best_mis)


@ATTACKS.register("iwd")
class IWDAttack(Attack):
    """The IWD attack (our formulation of arXiv 2103.07598; see :mod:`harden.attacks.iwd`).

    The budget is the threat model's ``rho`` (:data:`DEFAULT_RHO` = 2e-3 when it is None); the
    threat model's ``norm``/``eps`` are not used (``bounded = False``: the result is only
    clipped to [0, 1]; use ``linf_cap`` for an additional l_inf bound). After a call,
    ``self.last_iwd`` holds ``IWD(x, x_adv)`` of the returned examples.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> from harden.ot import iwd
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> attack = IWDAttack(ThreatModel(rho=1e-3), {"steps": 5})
        >>> adv = attack(TinyMLP(num_classes=2), x, y)
        >>> bool((iwd(x, adv) <= 1e-3 * 1.01).all()), attack.last_iwd.shape
        (True, torch.Size([4]))
    """

    name = "iwd"
    Params = IWDParams
    example_params = {"steps": 5}
    bounded = False

    last_iwd: torch.Tensor | None = None

    @property
    def rho(self) -> float:
        """The IWD budget: the threat model's ``rho``, or :data:`DEFAULT_RHO`."""
        return self.threat.rho if self.threat.rho is not None else DEFAULT_RHO

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run :func:`iwd_perturb` ``restarts`` times (random starts after the first); sets ``last_iwd``."""
        kwargs = self.params.model_dump()
        restarts = kwargs.pop("restarts")
        res = iwd_perturb(model, x, y, self.rho, **kwargs)
        x_adv, dist, fooled = res.x_adv.clone(), res.iwd.clone(), res.fooled.clone()
        for _ in range(1, restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            xs = x[todo]
            amplitude = min(self.params.step_size, self.params.linf_cap or math.inf)
            start = (xs + (torch.rand_like(xs) * 2 - 1) * amplitude).clamp(0.0, 1.0)
            again = iwd_perturb(model, xs, y[todo], self.rho, start=start, **kwargs)
            won = todo[again.fooled]
            x_adv[won], dist[won], fooled[won] = again.x_adv[again.fooled], again.iwd[again.fooled], True
        self.last_iwd = dist
        return x_adv
