"""Square Attack (Andriushchenko et al., ECCV 2020): score-based black-box random search.

The attack only ever *evaluates* the model (every forward pass runs under ``torch.no_grad()``;
no gradient is computed). It minimises the margin loss on the logits,
``f_y(x') - max_{k != y} f_k(x')``, by random search over localised square-shaped updates that
keep the perturbation on the boundary of the eps ball:

- **linf**: start from vertical stripes of width one whose colour per channel is ``±eps``;
  each step picks a square window at a uniformly random position and sets it, per channel, to
  ``x ± eps`` (a new vertex of the ball; a colour that would leave the window unchanged is
  redrawn, as in the authors' code).
- **l2**: start from a grid of squares, each holding a "pseudo-Gaussian" pattern of nested
  rectangles (``+`` in one half, ``-`` in the other) with a random sign per channel, rescaled to
  norm eps; each step draws two windows, moves the perturbation mass of both into the first one
  along a fresh pattern (plus the window's old direction) and empties the second, keeping
  ``||delta||_2 = eps`` exactly before clipping to [0, 1].

A proposal is kept when it lowers the margin. The side of the squares follows the paper's
piecewise-constant schedule of the fraction ``p`` of pixels changed (``p_init`` halved at
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query budget; for other
budgets the iteration index is rescaled to 10,000, as in the reference implementation).
Only the examples not fooled yet are queried, so each example stops as soon as it is fooled.

Differences from the reference implementations (documented, deliberate): window positions are
drawn per example rather than once per batch, over every valid position (the reference code never
places a window on the last row/column); the l2 step normalises the available mass per channel
as in the authors' original code; the budget ``n_queries`` counts the initial evaluation, so no
example ever costs more than ``n_queries`` queries per restart (the one clean evaluation that
selects the correctly classified examples is not counted).

Cost: an iteration is one forward pass of the examples still searched plus bookkeeping on their
windows only. The linf proposal is written into the best point in place and the old window written
back where it was rejected; the l2 step reads both windows and gets every norm it needs from them
(the one of the old perturbation is kept per example), so its only full-size work is the difference
to the best point and the rescaling to norm eps, in a reused buffer. The window offsets and the l2
patch are computed once per square size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackParams, channels_last_weights, layout_error
from harden.policy import ThreatModel

__all__ = ["Square", "SquareParams", "margin", "p_schedule"]

#: iterations (of a 10,000-query budget) after which the square-size fraction ``p`` halves
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareParams(AttackParams):
    """Parameters of :class:`Square`.

    Attributes:
        n_queries: query budget per example and restart (the initial evaluation included).
        p_init: initial fraction of the image's pixels covered by a square (the paper's 0.8).
        restarts: independent runs; later runs attack only the examples not fooled yet.
    """

    n_queries: int = Field(5000, ge=1, le=10_000_000)
    p_init: float = Field(0.8, gt=0, le=1)
    restarts: int = Field(1, ge=1, le=1000)


def p_schedule(it: int, n_queries: int, p_init: float) -> float:
    """Fraction of pixels changed at iteration ``it`` (the paper's piecewise schedule).

    The schedule is defined for 10,000 queries; for another budget ``it`` is rescaled to it.

    Example:
        >>> [p_schedule(i, 10_000, 0.8) for i in (0, 10, 11, 9000)]
        [0.8, 0.8, 0.4, 0.0015625]
        >>> p_schedule(100, 1000, 0.8)  # iteration 100 of 1,000 behaves as 1,000 of 10,000
        0.05
    """
    if n_queries != 10_000:
        it = int(it / n_queries * 10_000)
    return p_init / 2 ** sum(it > t for t in _HALVINGS)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margin ``f_y - max_{k != y} f_k`` per example (negative iff misclassified).

    Example:
        >>> margin(torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 0])).tolist()
        [1.0, -3.0]
    """
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return correct - others


def _rectangles(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Nested centred rectangles on a ``rows x cols`` grid, weight ``1/(k+1)^2`` for ring ``k``."""
    out = torch.zeros(rows, cols, device=device)
    if rows == 0 or cols == 0:
        return out
    r0, c0 = rows // 2, cols // 2  # centre cell, as in the paper's construction
    i = torch.arange(rows, device=device).view(-1, 1)
    j = torch.arange(cols, device=device).view(1, -1)
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        inside = (i >= r0 - k) & (i <= r0 + k) & (j >= c0 - k) & (j <= c0 + k)
        out += inside.float() / (k + 1) ** 2
    return out / out.norm().clamp_min(1e-12)


def _eta(s: int, device: torch.device) -> torch.Tensor:
    """The paper's l2 patch: rectangles ``+`` on the top half and ``-`` on the bottom, unit norm."""
    top = s // 2
    delta = torch.cat([_rectangles(top, s, device), -_rectangles(s - top, s, device)], dim=0)
    return delta / delta.norm().clamp_min(1e-12)


@dataclass
class _State:
    """The examples a run still searches: compact, contiguous rows (``best`` is updated in place)."""

    act: torch.Tensor  #: their rows in the run's batch
    x: torch.Tensor
    y: torch.Tensor
    best: torch.Tensor  #: best point found so far
    margin: torch.Tensor  #: its margin
    norm: torch.Tensor  #: ``||best - x||_2`` per row (what the l2 step needs of the old perturbation)
    work: torch.Tensor  #: l2: a reused buffer for the candidates (allocating one costs more than the math)

    @classmethod
    def of(
        cls, act: torch.Tensor, x: torch.Tensor, y: torch.Tensor, best: torch.Tensor, m: torch.Tensor, l2: bool
    ) -> _State:
        """The rows ``act`` of a run's batch (copies: the run's tensors are not touched)."""
        xa, ba = x[act].contiguous(), best[act].contiguous()
        work = torch.empty_like(xa) if l2 else xa[:0]
        return cls(act, xa, y[act], ba, m[act], _l2n(ba - xa, (1, 2, 3)).view(-1), work)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row but ``rows`` (a boolean mask)."""
        self.act, self.x, self.y, self.best = self.act[rows], self.x[rows], self.y[rows], self.best[rows]
        self.margin, self.norm = self.margin[rows], self.norm[rows]
        self.work = self.work[: self.x.shape[0]]  # a contiguous prefix: no new buffer


class _Windows:
    """Flat offsets of the pixels of an ``s x s`` window in a contiguous ``(c, h, w)`` image.

    The offsets change only when the schedule changes the side ``s``, so they are computed once
    per side (at most ten times a run); a window at ``(top, left)`` covers the flat positions
    ``top * w + left + offsets``. ``rows``/``cols`` give each window pixel's place in the window.
    """

    def __init__(self, c: int, h: int, w: int, device: torch.device) -> None:
        self.c, self.h, self.w, self.device = c, h, w, device
        self.side = -1
        self.offsets = self.rows = self.cols = torch.zeros(0, dtype=torch.long, device=device)
        self._eta_side = -1
        self._etas = (self.offsets, self.offsets)

    def patterns(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The l2 patch :func:`_eta` of side ``s`` and its transpose, flattened (cached per side)."""
        if s != self._eta_side:
            eta = _eta(s, self.device)
            self._etas, self._eta_side = (eta.flatten(), eta.t().flatten()), s
        return self._etas

    def at(self, s: int) -> torch.Tensor:
        """``(c * s * s,)`` offsets of the window pixels, channel-major (cached for the last side)."""
        if s != self.side:
            r = torch.arange(s, device=self.device)
            self.rows, self.cols = r.repeat_interleave(s), r.repeat(s)
            plane = self.rows * self.w + self.cols
            chans = torch.arange(self.c, device=self.device) * (self.h * self.w)
            self.offsets, self.side = (chans.view(-1, 1) + plane.view(1, -1)).flatten(), s
        return self.offsets

    def index(self, pos_h: torch.Tensor, pos_w: torch.Tensor, s: int) -> torch.Tensor:
        """``(N, c * s * s)`` flat indices, per example, of the windows at ``(pos_h, pos_w)``."""
        return (pos_h * self.w + pos_w).view(-1, 1) + self.at(s).view(1, -1)


def _random_signs(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1


def _nonempty_subsets(n: int, c: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, c)`` 0/1 indicators of uniformly random non-empty subsets of ``c`` channels."""
    if c <= 30:
        codes = torch.randint(1, 2**c, (n, 1), device=like.device)
        return ((codes >> torch.arange(c, device=like.device)) & 1).to(like.dtype)
    bits = torch.randint(0, 2, (n, c), device=like.device)
    while True:  # an empty subset has probability 2^-c: practically never redrawn
        empty = bits.sum(dim=1) == 0
        if not bool(empty.any()):
            return bits.to(like.dtype)
        bits[empty] = torch.randint(0, 2, (int(empty.sum()), c), device=like.device)


def _l2n(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=dims, keepdim=True)


@ATTACKS.register("square")
class Square(Attack):
    """Square Attack: query-efficient score-based black-box attack (linf and l2).

    After a call, ``last_query_counts`` holds the queries spent on each example (0 for examples
    misclassified already), ``last_queries`` their mean, and ``last_margins`` the margin loss
    ``f_y - max_{k != y} f_k`` of each returned example as the attack measured it (negative:
    fooled). Those margins come from the queries, which run on subsets of the rows; a forward of
    the whole returned batch can differ from them by float rounding, which matters only for
    examples stopped right below 0.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyMLP
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> attack = Square(ThreatModel(norm="linf", eps=0.1), {"n_queries": 50})
        >>> adv = attack(TinyMLP(num_classes=2), x, y)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6), bool(attack.last_query_counts.max() <= 50)
        (True, True)
    """

    name = "square"
    Params = SquareParams
    example_params = {"n_queries": 40}
    white_box = False

    def __init__(self, threat: ThreatModel, params: BaseModel | Mapping[str, Any] | None = None) -> None:
        super().__init__(threat, params)
        #: queries spent on each example by the last call (CPU tensor, int64)
        self.last_query_counts: torch.Tensor = torch.zeros(0, dtype=torch.long)
        #: mean of ``last_query_counts`` (0.0 before the first call)
        self.last_queries: float = 0.0
        #: margin of each returned example as measured by its last accepted query (CPU tensor)
        self.last_margins: torch.Tensor = torch.zeros(0)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run ``restarts`` searches, each on the examples the previous ones did not fool.

        On the CPU the queries run with the model's 4-D weights held channels_last
        (:func:`harden.attacks.base.channels_last_weights`; put back bit for bit after): the
        margins may differ from the standard layout's by float32 rounding, never the threat model.
        """
        restore = channels_last_weights(model, x)
        try:
            with torch.no_grad():
                return self._search(model, x, y, restore)
        finally:
            if restore is not None:
                restore()  # idempotent: also after a fallback in _search

    def _search(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, layout: Any) -> torch.Tensor:
        """The restarts; the first query falls back to the model's own layout if channels_last breaks it."""
        p: SquareParams = self.params
        best = x.clone()
        try:
            first = model(x)
        except RuntimeError as exc:
            if layout is None or not layout_error(exc):
                raise  # the model's own error, as the attack contract asks
            layout()  # e.g. a .view() of a channels_last activation: back to the model's own layout
            first = model(x)
        best_margin = margin(first, y)
        queries = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for restart in range(p.restarts):
            todo = (best_margin >= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            adv, m, q = self._run(model, x[todo], y[todo], restart)
            queries[todo] += q
            better = m < best_margin[todo]
            best[todo[better]] = adv[better]
            best_margin[todo[better]] = m[better]
            self.tick((restart + 1) / p.restarts)
        self.tick(1.0)  # also when every example was fooled before the last restart
        self.last_query_counts = queries.cpu()
        self.last_margins = best_margin.cpu()
        self.last_queries = float(queries.float().mean())
        return best

    # ------------------------------------------------------------------ one run
    def _init(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's starting point: vertical stripes (linf) or a grid of patches (l2)."""
        eps = self.threat.eps
        n, c, h, w = x.shape
        if self.threat.norm == "linf":
            return (x + eps * _random_signs((n, c, 1, w), x)).clamp(0.0, 1.0)
        s = max(min(h, w) // 5, 1)
        start_h, start_w = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
        delta = torch.zeros_like(x)
        for top in range(start_h, h - s + 1, s):
            for left in range(start_w, w - s + 1, s):
                patch = _eta(s, x.device)
                if bool(torch.rand((), device=x.device) > 0.5):
                    patch = patch.t()
                delta[:, :, top : top + s, left : left + s] += patch * _random_signs((n, c, 1, 1), x)
        return (x + delta / _l2n(delta, (1, 2, 3)).clamp_min(1e-12) * eps).clamp(0.0, 1.0)

    def _side(self, it: int, h: int, w: int) -> int:
        """Side of the squares at iteration ``it`` (odd and >= 3 for l2, as in the paper's code)."""
        p: SquareParams = self.params
        side = math.sqrt(p_schedule(it, p.n_queries, p.p_init) * h * w)  # = sqrt(p * n_features / c)
        if self.threat.norm == "linf":
            return min(max(round(side), 1), h, w)
        s = min(max(round(side), 3), h, w)
        return s + 1 if s % 2 == 0 and s + 1 <= min(h, w) else s

    def _step_linf(self, model: nn.Module, st: _State, it: int, win: _Windows) -> None:
        """One linf proposal per example, queried; ``st`` keeps the accepted ones.

        Only the windows are touched: the proposal is written into ``st.best`` in place, a copy
        of it is queried (a model that changes or keeps its input cannot touch the search's
        state), and the old window is written back where the margin did not drop.
        """
        eps = self.threat.eps
        n, c, h, w = st.x.shape
        s = self._side(it, h, w)
        pos_h = torch.randint(0, h - s + 1, (n,), device=st.x.device)
        pos_w = torch.randint(0, w - s + 1, (n,), device=st.x.device)
        signs = _random_signs((n, c, 1), st.x)
        idx = win.index(pos_h, pos_w, s)
        x_win = st.x.view(n, -1).gather(1, idx).view(n, c, -1)
        flat = st.best.view(n, -1)
        old = flat.gather(1, idx)
        new = (x_win + eps * signs).clamp_(0.0, 1.0).view(n, -1)
        # A draw that leaves the window as it is gets redrawn, as in the paper's code. Any other
        # colour changes the window (clip(x + eps) != clip(x - eps) for eps > 0), so redrawing
        # until a change is a uniform draw among the 2^c - 1 other colours: flip a non-empty,
        # uniformly drawn set of channels.
        same = (new - old).abs().amax(dim=1) < 1e-7
        flips = 1 - 2 * _nonempty_subsets(n, c, st.x).view(n, c, 1)
        signs = torch.where(same.view(-1, 1, 1), signs * flips, signs)
        new = (x_win + eps * signs).clamp_(0.0, 1.0).view(n, -1)
        flat.scatter_(1, idx, new)
        m_new = margin(model(st.best.clone()), st.y)
        improved = m_new < st.margin
        flat.scatter_(1, idx, torch.where(improved.view(-1, 1), new, old))
        st.margin = torch.where(improved, m_new, st.margin)

    def _step_l2(self, model: nn.Module, st: _State, it: int, win: _Windows) -> None:
        """One l2 proposal per example, queried; ``st`` keeps the accepted ones.

        The window norms come from the window pixels alone (the union of the two windows is the
        first window plus the second one's pixels outside it), and so does the norm of the new
        perturbation (the old norm, minus the union's old mass, plus the first window's new mass);
        the full-size work is the difference to the best point, the rescaling to norm eps and the
        query.
        """
        eps = self.threat.eps
        n, c, h, w = st.x.shape
        s = self._side(it, h, w)
        delta = torch.sub(st.best, st.x, out=st.work)
        pos_h = torch.randint(0, h - s + 1, (n,), device=st.x.device)
        pos_w = torch.randint(0, w - s + 1, (n,), device=st.x.device)
        pos_h2 = torch.randint(0, h - s + 1, (n,), device=st.x.device)
        pos_w2 = torch.randint(0, w - s + 1, (n,), device=st.x.device)
        idx1, idx2 = win.index(pos_h, pos_w, s), win.index(pos_h2, pos_w2, s)
        flat = delta.view(n, -1)
        d1, d2 = flat.gather(1, idx1).view(n, c, -1), flat.gather(1, idx2).view(n, c, -1)
        rows = (pos_h2 - pos_h).view(-1, 1) + win.rows  # window-2 pixels in window-1 coordinates
        cols = (pos_w2 - pos_w).view(-1, 1) + win.cols
        in_first = (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s)
        sq_w1 = d1.square().sum(dim=2, keepdim=True)  # per channel
        sq_union = sq_w1 + d2.square().masked_fill_(in_first.view(n, 1, -1), 0.0).sum(dim=2, keepdim=True)
        eta, eta_t = win.patterns(s)
        flip = torch.rand(n, device=st.x.device) > 0.5
        fresh = torch.where(flip.view(-1, 1, 1), eta_t, eta) * _random_signs((n, c, 1), st.x)
        new = fresh + d1 / (sq_w1.sqrt() + 1e-12)
        sq_img = st.norm.square().view(n, 1, 1)
        new = new / _l2n(new, (2,)).clamp_min(1e-12) * ((eps**2 - sq_img).clamp_min(0.0) / c + sq_union).sqrt()
        flat.scatter_(1, idx2, 0.0).scatter_(1, idx1, new.view(n, -1))
        sq_new = (sq_img.view(n) - sq_union.sum(dim=(1, 2)) + new.square().sum(dim=(1, 2))).clamp_min(0.0)
        scale = (eps / sq_new.sqrt().clamp_min(1e-12)).view(n, 1, 1, 1)
        x_new = torch.addcmul(st.x, delta, scale, out=delta).clamp_(0.0, 1.0)  # in the buffer
        m_new = margin(model(x_new.clone()), st.y)  # a copy: the model cannot touch the buffer
        improved = m_new < st.margin
        won = improved.nonzero().squeeze(1)  # few rows: cheaper than a full-size torch.where
        if won.numel() > 0:
            st.best[won] = x_new[won]
            st.norm[won] = _l2n(x_new[won] - st.x[won], (1, 2, 3)).view(-1)
        st.margin = torch.where(improved, m_new, st.margin)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, restart: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One search; returns the best points, their margins and the queries spent per example."""
        p: SquareParams = self.params
        x_best = self._init(x)
        best_margin = margin(model(x_best), y)
        queries = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        st = _State.of((best_margin >= 0).nonzero().squeeze(1), x, y, x_best, best_margin, self.threat.norm == "l2")
        win = _Windows(x.shape[1], x.shape[2], x.shape[3], x.device)
        step = self._step_linf if self.threat.norm == "linf" else self._step_l2
        for it in range(p.n_queries - 1):
            if st.act.numel() == 0:
                break
            if it % 50 == 0:
                self.tick((restart + it / p.n_queries) / p.restarts)
            step(model, st, it, win)
            done = st.margin < 0
            if bool(done.any()):
                idx = st.act[done]
                # every example still searched has spent one query per iteration plus the first one
                x_best[idx], best_margin[idx], queries[idx] = st.best[done], st.margin[done], it + 2
                st.keep(~done)
        x_best[st.act], best_margin[st.act], queries[st.act] = st.best, st.margin, p.n_queries
        return x_best, best_margin, queries
