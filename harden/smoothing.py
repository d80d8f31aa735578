"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): certified l2 radii.

The smoothed classifier ``g(x) = argmax_c P(f(x + d) = c)``, ``d ~ N(0, sigma^2 I)``, is
provably constant within the l2 ball of radius ``sigma * Phi^-1(pA_lower)`` around ``x``,
where ``pA_lower`` is a one-sided Clopper-Pearson lower confidence bound (level ``1 - alpha``)
on the probability of the top class. CERTIFY, as in the paper: pick the top class from ``n0``
noisy samples, then count it in ``n`` fresh samples; abstain when ``pA_lower < 1/2``.

The guarantee is about ``g`` (the base model under noise), not the base model itself, and holds
with probability ``1 - alpha`` per example. Noise is added in pixel space and not clipped to
[0, 1] (as in the paper), so the base model sees out-of-range inputs by design.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from scipy.stats import beta, norm
from torch import nn
from tqdm.auto import tqdm

from harden.batches import predictions
from harden.errors import PolicyError

__all__ = [
    "ABSTAIN",
    "SmoothingResult",
    "certified_accuracy",
    "clopper_pearson_lower",
    "sample_counts",
    "smooth_certify",
    "wilson_interval",
]

#: the class index reported when the smoothed classifier abstains
ABSTAIN = -1


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    Args:
        successes: observed successes (0 <= successes <= trials).
        trials: number of trials (>= 1).
        alpha: error probability (0 < alpha < 1).

    Returns:
        The bound; 0 when there are no successes.

    Example:
        >>> p = clopper_pearson_lower(100, 100, 0.001)   # all successes: the bound is alpha ** (1 / n)
        >>> round(p, 4), abs(p - 0.001 ** (1 / 100)) < 1e-9
        (0.9333, True)
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise PolicyError(f"expected 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    if not 0 < alpha < 1:
        raise PolicyError(f"expected 0 < alpha < 1, got {alpha}")
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval for a proportion (used for every accuracy we report).

    Example:
        >>> lo, hi = wilson_interval(50, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.404, 0.596)
    """
    if trials <= 0:
        return (0.0, 1.0)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return (lo, hi)


@torch.no_grad()
def sample_counts(
    model: nn.Module, x: torch.Tensor, n: int, sigma: float, batch_size: int, num_classes: int
) -> torch.Tensor:
    """Class counts of ``model`` on ``n`` Gaussian-noised copies of each image in ``x``.

    Noise is drawn on ``x``'s device from the global RNG (seed it for reproducibility); the
    copies of several images share one forward pass when ``n < batch_size``.

    Returns:
        A ``(len(x), num_classes)`` int64 tensor of counts. Each row sums to ``n`` less the noisy
        copies whose logits hold a NaN or infinity: those vote for no class.
    """
    counts = torch.zeros(x.shape[0], num_classes, dtype=torch.long, device=x.device)
    per_image = max(1, min(n, batch_size))
    images_per_pass = max(1, batch_size // per_image)
    for start in range(0, x.shape[0], images_per_pass):
        xs = x[start : start + images_per_pass]
        k = xs.shape[0]
        left = n
        while left > 0:
            m = min(left, per_image)
            batch = xs.repeat_interleave(m, dim=0)
            noisy = batch + sigma * torch.randn_like(batch)
            pred = predictions(model(noisy)).view(k, m)  # -1: non-finite logits, no vote
            counts[start : start + k] += nn.functional.one_hot(pred + 1, num_classes + 1)[..., 1:].sum(1)
            left -= m
    return counts


@dataclass
class SmoothingResult:
    """What :func:`smooth_certify` found.

    Attributes:
        sigma, n0, n, alpha: the CERTIFY settings.
        labels: true labels.
        predictions: the smoothed classifier's class per example (``ABSTAIN`` = -1).
        radii: certified l2 radius per example (0 when abstaining).
        seconds: wall time.
        samples: noisy forward passes made (``(n0 + n) * examples``).
    """

    sigma: float
    n0: int
    n: int
    alpha: float
    labels: list[int]
    predictions: list[int]
    radii: list[float]
    seconds: float
    samples: int
    curve: list[tuple[float, float]] = field(default_factory=list)

    @property
    def examples(self) -> int:
        """Examples certified."""
        return len(self.labels)

    @property
    def abstentions(self) -> int:
        """Examples on which the smoothed classifier abstained."""
        return sum(p == ABSTAIN for p in self.predictions)

    @property
    def samples_per_second(self) -> float:
        """Noisy forward passes per second (certification throughput)."""
        return self.samples / max(self.seconds, 1e-9)

    def accuracy_at(self, radius: float) -> float:
        """Certified accuracy: correct, not abstaining, and radius >= ``radius``."""
        return certified_accuracy(self.labels, self.predictions, self.radii, radius)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, with the derived counts."""
        return {
            **asdict(self),
            "examples": self.examples,
            "abstentions": self.abstentions,
            "samples_per_second": self.samples_per_second,
        }


def certified_accuracy(labels: list[int], predictions: list[int], radii: list[float], radius: float) -> float:
    """Share of examples the smoothed classifier gets right with certified radius >= ``radius``.

    Example:
        >>> certified_accuracy([0, 1, 2], [0, 1, ABSTAIN], [0.5, 0.1, 0.0], 0.2)
        0.3333333333333333
    """
    if not labels:
        return 0.0
    ok = sum(p == y and p != ABSTAIN and r >= radius for y, p, r in zip(labels, predictions, radii, strict=True))
    return ok / len(labels)


def smooth_certify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 256,
    radii: tuple[float, ...] = (),
    progress: bool = True,
) -> SmoothingResult:
    """CERTIFY (Cohen et al. 2019) for each example of ``(x, y)``.

    The model must already be in the mode you want (callers put it in eval mode) and on the
    device of ``x``; nothing is moved.

    Args:
        model: base classifier returning logits.
        x: images in [0, 1], NCHW.
        y: labels.
        sigma: noise standard deviation (pixel scale).
        n0: samples that choose the top class.
        n: samples that bound its probability.
        alpha: failure probability of each certificate.
        batch_size: noisy images per forward pass.
        radii: radii at which to report certified accuracy (the ``curve``).
        progress: show a progress bar.

    Returns:
        A :class:`SmoothingResult`.

    Example:
        >>> import torch
        >>> from harden.testing import ConstantClassifier
        >>> res = smooth_certify(ConstantClassifier(3, 1), torch.rand(2, 1, 4, 4), torch.tensor([1, 0]),
        ...                      sigma=0.5, n0=10, n=100, alpha=0.001, progress=False)
        >>> res.predictions, round(res.radii[0], 3)
        ([1, 1], 0.75)
    """
    _check_settings(sigma, n0, n, batch_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        num_classes = int(model(x[:1]).shape[1])
    preds: list[int] = []
    rads: list[float] = []
    chunk = max(1, batch_size // max(1, min(n, batch_size)))
    bar = tqdm(total=x.shape[0], desc="smoothing", disable=not progress, leave=False, unit="img")
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        for pred, radius in _certify_chunk(model, xs, sigma, n0, n, alpha, batch_size, num_classes):
            preds.append(pred)
            rads.append(radius)
        bar.update(xs.shape[0])
    bar.close()
    labels = [int(v) for v in y]
    res = SmoothingResult(
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        labels=labels,
        predictions=preds,
        radii=rads,
        seconds=time.perf_counter() - t0,
        samples=(n0 + n) * x.shape[0],
    )
    res.curve = [(float(r), res.accuracy_at(r)) for r in sorted(radii)]
    return res


def _check_settings(sigma: float, n0: int, n: int, batch_size: int) -> None:
    """Refuse sample counts or a batch size below 1 and a noise level that is not positive."""
    for key, value in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if value < 1:
            raise PolicyError(f"expected certify.{key} >= 1, got {value}")
    if sigma <= 0:
        raise PolicyError(f"expected certify.sigma > 0, got {sigma}")


def _certify_chunk(
    model: nn.Module, xs: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch_size: int, num_classes: int
) -> list[tuple[int, float]]:
    """CERTIFY's ``(prediction, radius)`` per image of ``xs``: top class from ``n0`` samples, its bound from ``n``."""
    top = sample_counts(model, xs, n0, sigma, batch_size, num_classes).argmax(1)
    counts = sample_counts(model, xs, n, sigma, batch_size, num_classes)
    out: list[tuple[int, float]] = []
    for i in range(xs.shape[0]):
        c = int(top[i])
        p_lower = clopper_pearson_lower(int(counts[i, c]), n, alpha)
        if p_lower < 0.5:
            out.append((ABSTAIN, 0.0))
        else:
            out.append((c, sigma * float(norm.ppf(p_lower))))
    return out
