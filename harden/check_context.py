"""What the sanity checks look at, and the PGD runs they share (:class:`CheckContext`).

The checks (:mod:`harden.checks`) and the eps sweep of :func:`harden.verify` read one context:
the clean logits are computed once, and every PGD run of a radius is cached, continued (more
steps, restarts) and warm-started from the largest radius below it, so that no run is repeated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.base import input_grad, normalize_grad, project, restore_modes, save_modes
from harden.attacks.pgd import random_start
from harden.batches import predictions
from harden.policy import ThreatModel

__all__ = ["AttackState", "CheckContext"]


@dataclass(frozen=True)
class AttackState:
    """Where the checks' PGD left each example of the check subset, and whether the model is right there.

    Attributes:
        eps: the radius: every point is inside the eps ball around its clean input, and in [0, 1].
        x_adv: per example, the first iterate the model got wrong (it stopped there), else the last.
        right: per example, the model is right at ``x_adv`` (a fresh forward pass, not the attack's
            own bookkeeping): the figure an attack reports is this count over the subset.
        start: the radius whose points the run continued (0.0: it started from random points).
    """

    eps: float
    x_adv: torch.Tensor
    right: torch.Tensor
    start: float = 0.0

    @property
    def accuracy(self) -> float:
        """Accuracy at ``x_adv``: a whole count over the subset."""
        return int(self.right.sum()) / max(int(self.right.numel()), 1)


@dataclass
class CheckContext:
    """What the checks look at: the model, a subset of test data, the threat model, and the suite.

    The clean logits and every PGD run are computed once and shared (:meth:`attack`,
    :meth:`extend`): the eps sweep of :func:`harden.verify` fills the cache the checks then read.

    Attributes:
        model: the model under evaluation (modes are restored after each check).
        x: pixels of the check subset.
        y: labels of the check subset.
        threat: the threat model.
        num_classes: classes of the task (for chance level).
        steps: PGD steps used by the checks' own attacks.
        broken_by: per example of the full evaluation, the first attack that fooled it.
        white_box: attack labels of the suite that use the model's gradients.
        history: per-epoch training history (for the catastrophic-overfitting probe).
        black_box: attack labels of the l_p suite that do not use the model's gradients.
        indices: per example of ``broken_by``, its index in the verified data (the examples a
            check lists are named by it); empty: by position.
        seed: the seed of the checks' random starts (None: drawn once from the global RNG).
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    num_classes: int
    steps: int = 20
    broken_by: Sequence[str] = ()
    white_box: Sequence[str] = ()
    history: Sequence[dict[str, Any]] = ()
    black_box: Sequence[str] = ()
    indices: Sequence[int] = ()
    seed: int | None = None
    _logits: torch.Tensor | None = field(default=None, init=False, repr=False)
    _states: dict[float, AttackState] = field(default_factory=dict, init=False, repr=False)

    def logits(self) -> torch.Tensor:
        """The model's logits on the clean subset (computed once, in eval mode)."""
        if self._logits is None:
            with _eval(self.model), torch.no_grad():
                self._logits = self.model(self.x)
        return self._logits

    def clean_accuracy(self) -> float:
        """Accuracy on the clean check subset."""
        return float((predictions(self.logits()) == self.y).float().mean())

    def attack(self, eps: float) -> AttackState:
        """PGD with ``steps`` steps of ``2.5 * eps / steps`` at radius ``eps`` on the subset (cached).

        Warm and monotone: the run continues the largest radius already attacked below ``eps``
        (else the clean inputs, from a random start seeded by ``seed``). An example wrong there
        keeps its point, which lies inside the smaller ball and so inside this one; only the
        examples still right are attacked, each from its point there. Every example counted
        wrong has a point inside the eps ball where a fresh forward pass is wrong, so the
        accuracy is an upper bound of the accuracy under attack at ``eps`` (never above the
        figure at a smaller radius for a deterministic model).
        """
        if eps not in self._states:
            below = [e for e in self._states if e < eps]
            base = self._states[max(below)] if below else AttackState(0.0, self.x, predictions(self.logits()) == self.y)
            self._states[eps] = self.extend(base, eps=eps, restart=None if below else 0)
        return self._states[eps]

    def extend(self, base: AttackState, *, eps: float | None = None, restart: int | None = None) -> AttackState:
        """``steps`` more PGD steps on the examples still right in ``base``; the others keep their point.

        Args:
            base: where an earlier run left the examples.
            eps: the radius (default ``base.eps``; not below it).
            restart: None continues from the points of ``base`` (projected onto the eps ball);
                ``k`` starts afresh from the random start number ``k`` of ``seed``.

        The step is ``2.5 * eps / steps``, as PGD's default.

        Raises:
            ValueError: ``eps`` below ``base.eps`` (the kept points would lie outside its ball).
        """
        eps = base.eps if eps is None else eps
        if eps < base.eps:
            raise ValueError(f"expected eps >= the base run's {base.eps:g} (its points lie in that ball), got {eps:g}")
        todo = base.right
        x, y, out = self.x[todo], self.y[todo], base.x_adv.clone()
        if x.shape[0]:
            if restart is None:
                start = project(base.x_adv[todo], x, self.threat.norm, eps)
            else:
                start = self._random_start(x, eps, restart)
            with _eval(self.model):
                out[todo] = self._pgd(x, y, start, eps)
        with _eval(self.model), torch.no_grad():
            right = predictions(self.model(out)) == self.y
        return AttackState(eps, out, right, base.eps if restart is None else 0.0)

    def _pgd(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, eps: float) -> torch.Tensor:
        """``steps`` PGD steps (cross-entropy, step ``2.5 * eps / steps``) from ``start`` in the eps ball and [0, 1].

        An example stops at the first iterate the model gets wrong (that point is returned, as PGD's
        ``select: misclassified`` keeps it); the others return their last iterate. The parameters
        are frozen meanwhile (no weight gradients); a non-finite gradient entry moves nothing.
        """
        norm, alpha, model = self.threat.norm, 2.5 * eps / self.steps, self.model
        out, idx, cur = start.clone(), torch.arange(x.shape[0], device=x.device), start
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits, grad = input_grad(model, cur, partial(_ce, y=y))
                    going = predictions(logits) == y
                    if not bool(going.all()):  # the examples fooled here stop, at this iterate
                        out[idx[~going]] = cur[~going]
                        idx, x, y, cur, grad = idx[going], x[going], y[going], cur[going], grad[going]
                        if idx.numel() == 0:
                            break
                    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                    cur = project(cur + alpha * normalize_grad(grad, norm), x, norm, eps)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        out[idx] = cur
        return out

    def _random_start(self, x: torch.Tensor, eps: float, k: int) -> torch.Tensor:
        if self.seed is None:
            self.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        dev = x.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed + k)
            return random_start(x, self.threat.norm, eps)


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode, its modes restored after."""
    modes = save_modes(model)
    model.eval()
    try:
        yield
    finally:
        restore_modes(model, modes)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")
