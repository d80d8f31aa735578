"""Targeted FAB (Croce & Hein, ICML 2020): fast adaptive boundary attack, as in AutoAttack's FAB-T.

FAB looks for a *minimally distorted* adversarial example. At each step it linearises, at the
current iterate ``x_i``, the decision boundary between the true class ``y`` and a target class
``t``: the hyperplane ``{z : g . (z - x_i) + f = 0}`` with ``f = f_t(x_i) - f_y(x_i)`` and
``g = grad_x f``. It computes the exact projections, for the attack's norm, of both ``x_i`` and
the original point ``x_0`` onto that hyperplane intersected with the box [0, 1]^d (``delta_i``,
``delta_0``), and steps to

    x_{i+1} = clip((1 - a) (x_i + eta delta_i) + a (x_0 + eta delta_0)),
    a = min(||delta_i|| / (||delta_i|| + ||delta_0||), alpha_max),

i.e. towards the boundary with an extrapolation ``eta`` and a bias ``a`` towards the original
point. Whenever ``x_{i+1}`` is adversarial it is recorded if it is the smallest so far, and the
iterate takes a backward step ``x_0 + beta (x_{i+1} - x_0)``.

FAB-T, as in AutoAttack's standard suite, runs this for the 2nd .. (n_target_classes + 1)-th
highest clean logits as targets (at most ``num_classes - 1`` of them), each target only on the
examples not broken yet; restarts after the first start at a random point of norm eps/2.

As an *evaluation* attack at the threat model's eps an example counts as broken when an
adversarial example of norm <= eps is found: it is returned; examples not broken (and those
misclassified already) are returned unchanged. With ``early_stop`` (default) an example stops
being attacked as soon as such a point is found, which leaves robust accuracy unchanged but
returns the first adversarial example within eps instead of the smallest one found in all steps.

Every success is re-checked once on the full batch before returning: the runs decide
"adversarial" on shrinking sub-batches, and FAB stops right at the decision boundary, where
float32 logits of the same point can differ between batch shapes by more than the point's logit
gap. An example whose returned point (after the threat model's projection, exactly what the
caller gets) is not misclassified by a forward on the whole batch is returned unchanged and
counted as not broken, so ``last_norms`` agrees with ``model(attack(model, x, y))`` run on the
same batch. Only such boundary ties are affected.

Each step costs a forward and backward pass at the iterate and a forward at the candidate. Folding
that test into the next step's gradient evaluation would save the forward only where the candidate
is not adversarial: where it is, the next gradient is needed at the backward-stepped point, not at
the candidate. FAB's extrapolation (``eta > 1``) makes most candidates adversarial (measured: 84 %
to 87 % on MNIST CNNs, 100 steps), so the folded loop needed more work per step, not less (22 % to
29 % more CPU time per step, measured on two MNIST CNNs).

Target screening (``screen_steps``, off by default): every target first gets one short run of
``screen_steps`` steps from the clean point, on the examples not broken yet. For each example
still not broken its targets are then ranked by how close the screen run came: first the targets
for which an adversarial point was found (of any norm, even above eps), by the smallest such
norm; then the others, by the linearised distance ``||delta_0||`` from the original point to the
target's boundary at the screen run's last step. Ties keep the clean-logit order. Only the
``full_targets`` best-ranked targets get the full ``steps``-step runs (``restarts`` each, exactly
the reference runs). ``screen_steps >= steps`` is the reference.

The attack also runs in float64 (through :meth:`FABTargeted.perturb`, bypassing the float32
pixel contract of ``__call__``): its norms then stay float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackParams, input_grad, lp_norm, project
from harden.batches import predictions
from harden.policy import ThreatModel

__all__ = ["FABParams", "FABTargeted", "project_hyperplane_box", "rank_targets"]

#: rows attacked by a run, and per row its smallest adversarial norm and last linearised distance
_Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FABParams(AttackParams):
    """Parameters of :class:`FABTargeted` (defaults: AutoAttack's standard FAB-T).

    Attributes:
        n_target_classes: targets per example, the 2nd .. (n+1)-th highest clean logits
            (capped at ``num_classes - 1``).
        steps: FAB iterations per target and restart.
        restarts: runs per target; the first starts at the clean point, the others at a random
            point of norm ``eps / 2``.
        alpha_max: largest bias ``a`` towards the original point.
        eta: extrapolation factor of the projection step (>= 1).
        beta: backward-step factor applied to an iterate that is adversarial.
        early_stop: stop attacking an example once an adversarial example of norm <= eps is found.
        screen_steps: ``None`` (the reference) or the steps of the one screen run every target
            gets before only the ``full_targets`` best-ranked targets of each example get the
            full runs (see the module docstring); ``>= steps`` is the reference.
        full_targets: targets per example that get the full runs after screening (capped at the
            number of targets).
    """

    n_target_classes: int = Field(9, ge=1, le=100_000)
    steps: int = Field(100, ge=1, le=100_000)
    restarts: int = Field(1, ge=1, le=1000)
    alpha_max: float = Field(0.1, ge=0, le=1)
    eta: float = Field(1.05, ge=1, le=10)
    beta: float = Field(0.9, gt=0, le=1)
    early_stop: bool = True
    #: left out of a policy's dump at their defaults: a policy that does not use them hashes as before
    added_later: ClassVar[frozenset[str]] = frozenset({"screen_steps", "full_targets"})
    screen_steps: int | None = Field(None, ge=1, le=100_000)
    full_targets: int = Field(1, ge=1, le=100_000)


def project_hyperplane_box(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Minimal-norm steps from ``t`` onto ``{z : <w, z> = b} ∩ [0, 1]^d``, one per row.

    Solves ``min ||delta||_p  s.t.  <w, t + delta> = b,  0 <= t + delta <= 1`` exactly for
    ``p = inf`` and ``p = 2``, vectorised over the rows of ``t`` (``(N, d)``, in [0, 1]). Writing
    ``r = b - <w, t>`` (made >= 0 by flipping the sign of ``w``) and ``cap_i`` for the room
    pixel ``i`` has in the direction ``sign(w_i)``, the optimum is
    ``delta_i = sign(w_i) min(lam, cap_i)`` (linf) or ``sign(w_i) min(mu |w_i|, cap_i)`` (l2),
    with the scalar ``lam`` / ``mu`` found among the sorted breakpoints where
    ``<w, delta>`` reaches ``r``. When the hyperplane does not meet the box the step goes to the
    box corner closest to it (``delta_i = sign(w_i) cap_i``).

    Args:
        t: points, ``(N, d)``.
        w: hyperplane normals, ``(N, d)``.
        b: offsets, ``(N,)``.
        norm: ``linf`` or ``l2``.

    Returns:
        The steps ``delta``, ``(N, d)``.

    Example:
        >>> t = torch.tensor([[0.5, 0.5]])
        >>> project_hyperplane_box(t, torch.tensor([[1.0, 1.0]]), torch.tensor([1.6]), "linf")
        tensor([[0.3000, 0.3000]])
        >>> project_hyperplane_box(t, torch.tensor([[1.0, 0.0]]), torch.tensor([0.9]), "l2")
        tensor([[0.4000, 0.0000]])
        >>> project_hyperplane_box(t, torch.tensor([[1.0, 0.1]]), torch.tensor([1.08]), "l2")  # box-bound
        tensor([[0.5000, 0.3000]])
    """
    r = b - (w * t).sum(dim=1)
    flip = torch.where(r < 0, -1.0, 1.0).to(w.dtype)
    w = w * flip[:, None]
    r = r * flip
    aw = w.abs()
    direction = torch.sign(w)
    cap = torch.where(w > 0, 1.0 - t, t)
    cap = torch.where(aw > 0, cap, torch.zeros_like(cap))
    if norm == "linf":
        key, weight = cap, aw  # g(lam) = sum_i aw_i min(lam, cap_i)
    else:
        key = torch.where(aw > 0, cap / aw.clamp_min(1e-30), torch.full_like(cap, float("inf")))
        weight = aw * aw  # h(mu) = sum_i aw_i min(mu aw_i, cap_i); slope sum aw_i^2 over unsaturated i
    order = key.argsort(dim=1)
    ks = key.gather(1, order)
    ws = weight.gather(1, order)
    sat = (aw * cap).gather(1, order)  # contribution of a saturated pixel
    sat_cum = sat.cumsum(dim=1)  # saturated pixels up to and including position k
    rest = (weight.sum(dim=1, keepdim=True) - ws.cumsum(dim=1)).clamp_min(0.0)  # slope after k
    finite = torch.isfinite(ks)
    value_at = torch.where(finite, sat_cum + torch.where(finite, ks, 0.0) * rest, sat_cum)
    k = (value_at < r[:, None]).sum(dim=1)  # breakpoints passed before reaching r
    d = t.shape[1]
    feasible = k < d
    kk = (k - 1).clamp_min(0)[:, None]
    prev_sat = torch.where(k[:, None] > 0, sat_cum.gather(1, kk), 0.0).squeeze(1)
    prev_slope = torch.where(k[:, None] > 0, rest.gather(1, kk), weight.sum(dim=1, keepdim=True)).squeeze(1)
    lo = torch.where(k[:, None] > 0, ks.gather(1, kk), 0.0).squeeze(1)
    hi = ks.gather(1, k.clamp_max(d - 1)[:, None]).squeeze(1)
    scale = ((r - prev_sat) / prev_slope.clamp_min(1e-30)).clamp_min(0.0)
    scale = torch.minimum(torch.maximum(scale, lo), hi)
    scale = torch.where(feasible, scale, torch.full_like(scale, float("inf")))
    reach = scale[:, None] if norm == "linf" else torch.where(aw > 0, scale[:, None] * aw, 0.0)
    return direction * torch.minimum(reach, cap)


def _gap(logits: torch.Tensor, target: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``f_target - f_label`` per example (positive iff the target beats the label)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, target] - logits[rows, label]


def rank_targets(found: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """Order of the targets per example after the screen runs, most promising first.

    Targets with an adversarial point found (finite ``found``) come first, by its norm; then the
    others, by the linearised distance ``lin``. Sorting is stable: ties keep the column order
    (the clean-logit order of the targets).

    Args:
        found: smallest adversarial norm per example and target, ``inf`` where none, ``(N, T)``.
        lin: linearised distance to the target's boundary at the last screen step, ``(N, T)``.

    Returns:
        Column indices, ``(N, T)``.

    Example:
        >>> inf = float("inf")
        >>> rank_targets(torch.tensor([[inf, 0.5, 0.3, inf]]), torch.tensor([[0.1, 0.2, 0.2, 0.1]]))
        tensor([[2, 1, 0, 3]])
    """
    missing = ~torch.isfinite(found)
    key = torch.where(missing, lin, found)
    by_key = key.argsort(dim=1, stable=True)
    by_group = missing.gather(1, by_key).to(torch.uint8).argsort(dim=1, stable=True)
    return by_key.gather(1, by_group)


@ATTACKS.register("fab_t")
class FABTargeted(Attack):
    """Targeted FAB (FAB-T), minimal-norm white-box attack, evaluated at the threat model's eps.

    After a call, ``last_norms`` holds, per example, the norm of the adversarial example returned
    (0 for examples misclassified already, ``inf`` where none was found within eps). A finite norm
    means the returned example is misclassified by a forward of the whole returned batch (the
    same computation as ``model(attack(model, x, y))``), see the module docstring.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> attack = FABTargeted(ThreatModel(norm="l2", eps=2.0), {"steps": 10, "screen_steps": 3})
        >>> adv = attack(TinyMLP(num_classes=3), x, y)
        >>> bool((adv - x).flatten(1).norm(dim=1).max() <= 2.0 + 1e-5)
        True
    """

    name = "fab_t"
    Params = FABParams
    example_params = {"steps": 5, "n_target_classes": 2, "screen_steps": 2}

    def __init__(self, threat: ThreatModel, params: BaseModel | Mapping[str, Any] | None = None) -> None:
        super().__init__(threat, params)
        #: norm of the returned adversarial example per example of the last call (CPU tensor)
        self.last_norms: torch.Tensor = torch.zeros(0)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attack the target classes (all of them, or the screened best) on the examples not broken yet."""
        p: FABParams = self.params
        eps = self.threat.eps
        with torch.no_grad():
            logits = model(x)
        robust = predictions(logits) == y  # non-finite logits: already wrong
        n_targets = min(p.n_target_classes, logits.shape[1] - 1)
        targets = logits.argsort(dim=1, descending=True)[:, 1 : n_targets + 1]
        out = x.clone()
        norms = torch.where(robust, float("inf"), 0.0).to(x.dtype)
        record = partial(self._attack_rows, model, x, y, out, norms, robust)
        if p.screen_steps is None or p.screen_steps >= p.steps:
            for k in range(n_targets * p.restarts):
                if not bool(robust.any()):
                    break
                record(targets[:, k // p.restarts], p.steps, random_start=k % p.restarts > 0)
                self.tick((k + 1) / (n_targets * p.restarts))
        else:
            self._screened(record, targets, robust, p.screen_steps)
        self.tick(1.0)
        with torch.no_grad():  # re-check on the whole batch what __call__ will return (see module doc)
            fooled = predictions(model(project(out, x, self.threat.norm, eps))) != y
        lost = torch.isfinite(norms) & (norms > 0) & ~fooled
        out[lost] = x[lost]
        norms[lost] = float("inf")
        self.last_norms = norms.cpu()
        return out

    def _screened(self, record: Callable[..., _Rows], targets: torch.Tensor, robust: torch.Tensor, screen: int) -> None:
        """Screen every target, then run the full runs on each example's best-ranked targets."""
        p: FABParams = self.params
        n_targets = targets.shape[1]
        full = min(p.full_targets, n_targets)
        total = n_targets * screen + full * p.restarts * p.steps
        found = torch.full(targets.shape, float("inf"), dtype=torch.float64, device=targets.device)
        lin = found.clone()
        for k in range(n_targets):
            if not bool(robust.any()):
                return
            idx, found_k, lin_k = record(targets[:, k], screen, random_start=False)
            found[idx, k], lin[idx, k] = found_k.double(), lin_k.double()
            self.tick((k + 1) * screen / total)
        chosen = targets.gather(1, rank_targets(found, lin)[:, :full])
        for k in range(full * p.restarts):
            if not bool(robust.any()):
                return
            record(chosen[:, k // p.restarts], p.steps, random_start=k % p.restarts > 0)
            self.tick((n_targets * screen + (k + 1) * p.steps) / total)

    def _attack_rows(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        out: torch.Tensor,
        norms: torch.Tensor,
        robust: torch.Tensor,
        target: torch.Tensor,
        steps: int,
        random_start: bool,
    ) -> _Rows:
        """One run on the ``robust`` rows towards ``target`` (one per row); successes within eps update ``out``, ``norms`` and ``robust`` in place.

        Returns the rows attacked and, per such row, the run's smallest adversarial norm and last linearised distance.
        """
        idx = robust.nonzero().squeeze(1)
        adv, found, lin = self._run(model, x[idx], y[idx], target[idx], random_start, steps)
        ok = found <= self.threat.eps
        out[idx[ok]] = adv[ok]
        norms[idx[ok]] = found[ok]
        robust[idx[ok]] = False
        return idx, found, lin

    def _run(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor,
        random_start: bool,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One FAB run of ``steps`` steps towards ``target``.

        Returns, per row, the smallest adversarial point found (``x0`` where none), its norm
        (``inf`` where none) and ``||delta_0||`` of the last step (``inf`` for rows stopped early).
        """
        p: FABParams = self.params
        view = (-1,) + (1,) * (x0.dim() - 1)
        x1 = self._start(x0) if random_start else x0.clone()
        best = x0.clone()
        best_norm = torch.full((x0.shape[0],), float("inf"), device=x0.device, dtype=x0.dtype)
        lin = best_norm.clone()
        act = torch.arange(x0.shape[0], device=x0.device)  # rows still attacked, with compact copies:
        xa, ya, ta = x0, y, target
        for _ in range(steps):
            logits, grad = input_grad(model, x1, partial(_gap, target=ta, label=ya))
            with torch.no_grad():
                x1, lin[act] = self._step(x1, xa, ya, ta, logits, grad)
                is_adv = self._record(model(x1), x1, xa, ya, act, best, best_norm)
                x1 = torch.where(is_adv.view(view), xa + p.beta * (x1 - xa), x1)
            if p.early_stop:
                keep = best_norm[act] > self.threat.eps
                if not bool(keep.all()):
                    act, xa, ya, ta, x1 = act[keep], xa[keep], ya[keep], ta[keep], x1[keep]
                    if act.numel() == 0:
                        break
        return best, best_norm, lin

    def _start(self, x0: torch.Tensor) -> torch.Tensor:
        """A random point at norm ``eps / 2`` around ``x0``, clipped to the box."""
        norm = self.threat.norm
        t = torch.rand_like(x0) * 2 - 1 if norm == "linf" else torch.randn_like(x0)
        t = t / lp_norm(t, norm).clamp_min(1e-12).view((-1,) + (1,) * (x0.dim() - 1))
        return (x0 + 0.5 * self.threat.eps * t).clamp(0.0, 1.0)

    def _step(
        self,
        x1: torch.Tensor,
        xa: torch.Tensor,
        ya: torch.Tensor,
        ta: torch.Tensor,
        logits: torch.Tensor,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next candidate from the linearisation at ``x1``, and ``||delta_0||`` per row."""
        p: FABParams = self.params
        norm, m = self.threat.norm, x1.shape[0]
        w = grad.flatten(1)
        b = (w * x1.flatten(1)).sum(dim=1) - _gap(logits, ta, ya)  # boundary of the linear model: <w, z> = b
        steps = project_hyperplane_box(
            torch.cat([x1.flatten(1), xa.flatten(1)]), torch.cat([w, w]), torch.cat([b, b]), norm
        )
        d_cur, d_orig = steps[:m].view_as(x1), steps[m:].view_as(x1)
        n_cur = lp_norm(d_cur, norm).clamp_min(1e-8)
        n_orig = lp_norm(d_orig, norm).clamp_min(1e-8)
        alpha = (n_cur / (n_cur + n_orig)).clamp(0.0, p.alpha_max).view((-1,) + (1,) * (x1.dim() - 1))
        x_new = ((1 - alpha) * (x1 + p.eta * d_cur) + alpha * (xa + p.eta * d_orig)).clamp(0.0, 1.0)
        return x_new, n_orig

    def _record(
        self,
        logits: torch.Tensor,
        x1: torch.Tensor,
        xa: torch.Tensor,
        ya: torch.Tensor,
        act: torch.Tensor,
        best: torch.Tensor,
        best_norm: torch.Tensor,
    ) -> torch.Tensor:
        """Record the candidates ``x1`` that are adversarial and closer than the best so far; returns which are adversarial."""
        is_adv = predictions(logits) != ya
        dist = lp_norm(x1 - xa, self.threat.norm)
        better = is_adv & (dist < best_norm[act])
        best[act[better]] = x1[better]
        best_norm[act[better]] = dist[better]
        return is_adv
