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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackParams
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


def _window_mask(pos_h: torch.Tensor, pos_w: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """Boolean ``(N, 1, h, w)`` masks of ``s x s`` windows with top-left corners ``(pos_h, pos_w)``."""
    rows = torch.arange(h, device=pos_h.device).view(1, h) - pos_h.view(-1, 1)
    cols = torch.arange(w, device=pos_w.device).view(1, w) - pos_w.view(-1, 1)
    in_r = (rows >= 0) & (rows < s)
    in_c = (cols >= 0) & (cols < s)
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


def _place(patches: torch.Tensor, pos_h: torch.Tensor, pos_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Paste per-example ``(N, s, s)`` patches at ``(pos_h, pos_w)`` of zero ``(N, 1, h, w)`` maps."""
    n, s = patches.shape[0], patches.shape[1]
    rows = torch.arange(h, device=patches.device).view(1, h) - pos_h.view(-1, 1)
    cols = torch.arange(w, device=patches.device).view(1, w) - pos_w.view(-1, 1)
    inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
    batch = torch.arange(n, device=patches.device).view(-1, 1, 1)
    vals = patches[batch, rows.clamp(0, s - 1)[:, :, None], cols.clamp(0, s - 1)[:, None, :]]
    return (vals * inside)[:, None]


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
    return t.pow(2).sum(dim=dims, keepdim=True).sqrt()


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
        """Run ``restarts`` searches, each on the examples the previous ones did not fool."""
        p: SquareParams = self.params
        with torch.no_grad():
            best = x.clone()
            best_margin = margin(model(x), y)
            queries = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            for _ in range(p.restarts):
                todo = (best_margin >= 0).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                adv, m, q = self._run(model, x[todo], y[todo])
                queries[todo] += q
                better = m < best_margin[todo]
                best[todo[better]] = adv[better]
                best_margin[todo[better]] = m[better]
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

    def _propose(self, x: torch.Tensor, x_best: torch.Tensor, it: int) -> torch.Tensor:
        """One random-search candidate per example (windows drawn per example)."""
        p: SquareParams = self.params
        eps = self.threat.eps
        n, c, h, w = x.shape
        frac = p_schedule(it, p.n_queries, p.p_init)
        side = math.sqrt(frac * h * w)  # = sqrt(p * n_features / c)
        if self.threat.norm == "linf":
            s = min(max(round(side), 1), h, w)
            pos_h = torch.randint(0, h - s + 1, (n,), device=x.device)
            pos_w = torch.randint(0, w - s + 1, (n,), device=x.device)
            mask = _window_mask(pos_h, pos_w, s, h, w)
            signs = _random_signs((n, c, 1, 1), x)
            cand = torch.where(mask, (x + eps * signs).clamp(0.0, 1.0), x_best)
            # A draw that leaves the window as it is gets redrawn, as in the paper's code. Any other
            # colour changes the window (clip(x + eps) != clip(x - eps) for eps > 0), so redrawing
            # until a change is a uniform draw among the 2^c - 1 other colours: flip a non-empty,
            # uniformly drawn set of channels.
            same = (cand - x_best).abs().flatten(1).amax(dim=1) < 1e-7
            flips = 1 - 2 * _nonempty_subsets(n, c, x).view(n, c, 1, 1)
            signs = torch.where(same.view(-1, 1, 1, 1), signs * flips, signs)
            return torch.where(mask, (x + eps * signs).clamp(0.0, 1.0), x_best)

        s = min(max(round(side), 3), h, w)
        if s % 2 == 0 and s + 1 <= min(h, w):
            s += 1
        delta = x_best - x
        pos_h = torch.randint(0, h - s + 1, (n,), device=x.device)
        pos_w = torch.randint(0, w - s + 1, (n,), device=x.device)
        pos_h2 = torch.randint(0, h - s + 1, (n,), device=x.device)
        pos_w2 = torch.randint(0, w - s + 1, (n,), device=x.device)
        mask1 = _window_mask(pos_h, pos_w, s, h, w).to(x.dtype)
        union = torch.maximum(mask1, _window_mask(pos_h2, pos_w2, s, h, w).to(x.dtype))
        norm_img = _l2n(delta, (1, 2, 3))
        norm_w1 = _l2n(delta * mask1, (2, 3))  # per channel
        norm_union = _l2n(delta * union, (2, 3))
        eta = _eta(s, x.device)
        flip = torch.rand(n, device=x.device) > 0.5
        patches = torch.where(flip.view(-1, 1, 1), eta.t().expand(n, s, s), eta.expand(n, s, s))
        fresh = _place(patches, pos_h, pos_w, h, w) * _random_signs((n, c, 1, 1), x)
        new = fresh + delta * mask1 / (norm_w1 + 1e-12)
        budget = ((eps**2 - norm_img**2).clamp_min(0.0) / c + norm_union**2).sqrt()
        new = new / _l2n(new, (2, 3)).clamp_min(1e-12) * budget
        delta = delta * (1 - union) + new * mask1
        return (x + delta / _l2n(delta, (1, 2, 3)).clamp_min(1e-12) * eps).clamp(0.0, 1.0)

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One search; returns the best points, their margins and the queries spent per example."""
        p: SquareParams = self.params
        x_best = self._init(x)
        best_margin = margin(model(x_best), y)
        queries = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        # compact working copies of the examples still to fool
        act = (best_margin >= 0).nonzero().squeeze(1)
        xa, ya, xba, ma = x[act], y[act], x_best[act], best_margin[act]
        qa = queries[act]
        for it in range(p.n_queries - 1):
            if act.numel() == 0:
                break
            x_new = self._propose(xa, xba, it)
            m_new = margin(model(x_new), ya)
            qa = qa + 1
            improved = m_new < ma
            xba = torch.where(improved.view(-1, 1, 1, 1), x_new, xba)
            ma = torch.where(improved, m_new, ma)
            done = ma < 0
            if bool(done.any()):
                idx = act[done]
                x_best[idx], best_margin[idx], queries[idx] = xba[done], ma[done], qa[done]
                keep = ~done
                act, xa, ya, xba, ma, qa = act[keep], xa[keep], ya[keep], xba[keep], ma[keep], qa[keep]
        x_best[act], best_margin[act], queries[act] = xba, ma, qa
        return x_best, best_margin, queries
