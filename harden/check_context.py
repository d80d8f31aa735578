"""What the sanity checks look at, and the PGD runs they share (:class:`CheckContext`).

The checks (:mod:`harden.checks`) and the eps sweep of :func:`harden.verify` read one context:
the clean logits are computed once, the threat's radius starts from the suite's own worst case
(``suite_adv``: what the cascade already computed, not attacked again), and every PGD run of a
radius is cached and continued (more steps, restarts), so that no run is repeated. A radius above
the threat's continues the largest one below it; a radius below it attacks only the examples
fooled at the nearest larger one (a point of a smaller ball lies in the larger one, which was
searched already).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.base import (
    channels_last_weights,
    input_grad,
    layout_error,
    normalize_grad,
    project,
    restore_modes,
    save_modes,
)
from harden.attacks.pgd import random_start
from harden.batches import predictions
from harden.policy import ThreatModel

__all__ = ["AttackState", "CheckContext", "sweep_radii"]


def sweep_radii(asked: Sequence[float] | None, threat: ThreatModel) -> list[float]:
    """The eps sweep's radii, smallest first, each once.

    ``asked`` (None: 0.25, 0.5, 1, 1.5 and 2 times ``threat.eps``), without linf radii above 1
    (the ball of radius 1 already covers the whole box).

    Example:
        >>> sweep_radii(None, ThreatModel(eps=0.2))
        [0.05, 0.1, 0.2, 0.30000000000000004, 0.4]
        >>> sweep_radii([0.5, 2.0, 0.5], ThreatModel(eps=0.1))
        [0.5]
    """
    radii = asked if asked is not None else [f * threat.eps for f in (0.25, 0.5, 1, 1.5, 2)]
    return sorted({float(e) for e in radii if not (threat.norm == "linf" and e > 1)})


@dataclass(frozen=True)
class AttackState:
    """Where the checks' PGD left each example of the check subset, and whether the model is right there.

    Attributes:
        eps: the radius: every point is inside the eps ball around its clean input, and in [0, 1].
        x_adv: per example, the first iterate the model got wrong (it stopped there), else the last.
        right: per example, the model is right at ``x_adv`` (a fresh forward pass, not the attack's
            own bookkeeping): the figure an attack reports is this count over the subset.
        start: the radius whose points the run continued (0.0: it started from random points,
            or it is the suite's own outcome).
        origin: what produced the points: ``"pgd"`` (the checks' PGD) or ``"suite"`` (the
            verification's attack suite, at the threat's radius).
    """

    eps: float
    x_adv: torch.Tensor
    right: torch.Tensor
    start: float = 0.0
    origin: str = "pgd"

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
        steps: PGD steps of the checks' own runs (``more_iterations_never_help``'s continuation
            and restart: :meth:`extend`).
        sweep_steps: PGD steps of each radius of :meth:`attack` (the eps sweep, and the
            large-radius checks that continue it); None: ``steps``.
        broken_by: per example of the full evaluation, the first attack that fooled it.
        white_box: attack labels of the suite that use the model's gradients.
        history: per-epoch training history (for the catastrophic-overfitting probe).
        black_box: attack labels of the l_p suite that do not use the model's gradients.
        indices: per example of ``broken_by``, its index in the verified data (the examples a
            check lists are named by it); empty: by position.
        seed: the seed of the checks' random starts (None: drawn once from the global RNG).
        suite_adv: per example of the subset, its worst-case input under the verification's l_p
            suite at ``threat.eps`` (the point of the attack that fooled it, else the last attack's
            output; the clean input where none ran). Given, it is the run at ``threat.eps``; None:
            that radius is attacked with PGD like any other.

    Raises:
        ValueError: ``suite_adv`` not of the shape, dtype and device of ``x``. Its points are
            projected onto the eps ball around ``x`` and [0, 1] (a no-op on an attack's output).
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    num_classes: int
    steps: int = 20
    sweep_steps: int | None = None
    broken_by: Sequence[str] = ()
    white_box: Sequence[str] = ()
    history: Sequence[dict[str, Any]] = ()
    black_box: Sequence[str] = ()
    indices: Sequence[int] = ()
    seed: int | None = None
    suite_adv: torch.Tensor | None = None
    _logits: torch.Tensor | None = field(default=None, init=False, repr=False)
    _states: dict[float, AttackState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        adv = self.suite_adv
        if adv is None:
            return
        if adv.shape != self.x.shape or adv.dtype != self.x.dtype or adv.device != self.x.device:
            want = f"{tuple(self.x.shape)} {self.x.dtype} on {self.x.device}"
            raise ValueError(
                f"expected suite_adv like the check subset ({want}), got {tuple(adv.shape)} {adv.dtype} on {adv.device}"
            )
        self.suite_adv = project(adv, self.x, self.threat.norm, float(self.threat.eps))

    def sweep(
        self, radii: Sequence[float], on_radius: Callable[[float], None] | None = None
    ) -> dict[float, AttackState]:
        """:meth:`attack` every radius of ``radii`` in the order that keeps the curve monotone.

        With the suite's outcome: the radii below ``threat.eps`` largest first (each continues the
        next larger one), then the others smallest first; without it, smallest first.
        ``on_radius(eps)`` hears each radius before it runs (a progress bar).
        """
        unique = sorted(set(radii))
        suite = self._suite()
        below = [e for e in reversed(unique) if suite is not None and e < suite.eps]
        out: dict[float, AttackState] = {}
        for eps in below + [e for e in unique if e not in below]:
            if on_radius is not None:
                on_radius(eps)
            out[eps] = self.attack(eps)
        return out

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
        """Where the examples of the subset stand at radius ``eps`` (cached): the suite's outcome, or PGD.

        At ``threat.eps`` with ``suite_adv``: the suite's own worst case (nothing is attacked).
        Otherwise PGD with ``sweep_steps`` steps of ``2.5 * eps / sweep_steps``, warm and monotone:

        - above every radius below it that was attacked (and above ``threat.eps`` when the suite's
          outcome is given), the run continues the largest radius below (else the clean inputs,
          from a random start seeded by ``seed``): an example wrong there keeps its point, which
          lies inside the smaller ball; only the examples still right are attacked, from their
          point there;
        - below ``threat.eps`` when the suite's outcome is given, only the examples fooled at the
          nearest larger radius are attacked, from their point there projected onto this ball;
          an example that no attack fooled in the larger ball counts as right (its clean input)
          without being attacked again. Ask such radii largest first (as :func:`harden.verify`'s
          sweep does) so that each continues the next.

        Every example counted wrong has a point inside the eps ball where a fresh forward pass is
        wrong, so the accuracy is an upper bound of the accuracy under attack at ``eps`` (never
        above the figure at a smaller radius for a deterministic model).
        """
        suite = self._suite()
        if eps not in self._states:
            if suite is not None and eps < suite.eps:
                self._states[eps] = self._shrink(self._states[min(e for e in self._states if e > eps)], eps)
            else:
                below = [e for e in self._states if e < eps]
                clean = AttackState(0.0, self.x, predictions(self.logits()) == self.y)
                base = self._states[max(below)] if below else clean
                self._states[eps] = self.extend(base, eps=eps, restart=None if below else 0, steps=self.sweep_steps)
        return self._states[eps]

    def _suite(self) -> AttackState | None:
        """The suite's outcome at ``threat.eps`` (a fresh forward pass on ``suite_adv``), cached; None without it."""
        eps = float(self.threat.eps)
        if self.suite_adv is not None and eps not in self._states:
            with _eval(self.model), torch.no_grad():
                right = predictions(self.model(self.suite_adv)) == self.y
            self._states[eps] = AttackState(eps, self.suite_adv, right, origin="suite")
        return self._states.get(eps) if self.suite_adv is not None else None

    def _shrink(self, base: AttackState, eps: float) -> AttackState:
        """PGD at ``eps`` below ``base.eps`` on the examples right when clean and fooled at ``base``, from their point there.

        The others keep their clean input: right when clean and not fooled in the larger ball
        (counted right, not attacked), or wrong when clean.
        """
        todo = (predictions(self.logits()) == self.y) & ~base.right
        out = self.x.clone()
        if bool(todo.any()):
            x, y = self.x[todo], self.y[todo]
            with _eval(self.model):
                start = project(base.x_adv[todo], x, self.threat.norm, eps)
                out[todo] = self._pgd(x, y, start, eps, self.sweep_steps or self.steps)
        with _eval(self.model), torch.no_grad():
            right = predictions(self.model(out)) == self.y
        return AttackState(eps, out, right, base.eps)

    def extend(
        self, base: AttackState, *, eps: float | None = None, restart: int | None = None, steps: int | None = None
    ) -> AttackState:
        """``steps`` more PGD steps on the examples still right in ``base``; the others keep their point.

        Args:
            base: where an earlier run left the examples.
            eps: the radius (default ``base.eps``; not below it).
            restart: None continues from the points of ``base`` (projected onto the eps ball);
                ``k`` starts afresh from the random start number ``k`` of ``seed``.
            steps: PGD steps (None: the context's ``steps``).

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
                out[todo] = self._pgd(x, y, start, eps, steps or self.steps)
        with _eval(self.model), torch.no_grad():
            right = predictions(self.model(out)) == self.y
        return AttackState(eps, out, right, base.eps if restart is None else 0.0)

    def _pgd(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
        """``steps`` PGD steps (cross-entropy, step ``2.5 * eps / steps``) from ``start`` in the eps ball and [0, 1].

        An example stops at the first iterate the model gets wrong (that point is returned, as PGD's
        ``select: misclassified`` keeps it); the others return their last iterate. The parameters
        are frozen meanwhile (no weight gradients); a non-finite gradient entry moves nothing. On
        the CPU the model's 4-D weights are held channels_last meanwhile
        (:func:`harden.attacks.base.channels_last_weights`: the same gradients up to float32
        rounding, 10-30 % faster on the convolutional models measured; put back bit for bit after),
        unless the model breaks on that layout (then it keeps its own).
        """
        model = self.model
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        layout = None
        try:
            layout = channels_last_weights(model, x)
            with torch.enable_grad():
                try:
                    first = input_grad(model, start, partial(_ce, y=y))
                except RuntimeError as exc:
                    if layout is None or not layout_error(exc):
                        raise
                    layout()  # the model views a channels_last activation: back to its own layout
                    layout = None
                    first = input_grad(model, start, partial(_ce, y=y))
                return self._steps(x, y, start, eps, steps, first)
        finally:
            if layout is not None:
                layout()
            for p in frozen:
                p.requires_grad_(True)

    def _steps(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        start: torch.Tensor,
        eps: float,
        steps: int,
        first: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The PGD loop of :meth:`_pgd`; ``first`` is the logits and gradient at ``start``."""
        norm, alpha = self.threat.norm, 2.5 * eps / steps
        out, idx, cur = start.clone(), torch.arange(x.shape[0], device=x.device), start
        for k in range(steps):
            logits, grad = first if k == 0 else input_grad(self.model, cur, partial(_ce, y=y))
            going = predictions(logits) == y
            if not bool(going.all()):  # the examples fooled here stop, at this iterate
                out[idx[~going]] = cur[~going]
                idx, x, y, cur, grad = idx[going], x[going], y[going], cur[going], grad[going]
                if idx.numel() == 0:
                    break
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            cur = project(cur + alpha * normalize_grad(grad, norm), x, norm, eps)
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
