"""harden.smoothing: Clopper-Pearson and Wilson bounds, noise votes, and CERTIFY on a classifier whose answer is known."""

import math

import pytest
import torch
from scipy.stats import beta, binom, norm

import harden
from harden.smoothing import (
    ABSTAIN,
    certified_accuracy,
    clopper_pearson_lower,
    sample_counts,
    smooth_certify,
    wilson_interval,
)
from harden.testing import ConstantClassifier, TinyCNN, synthetic_tensors


@pytest.mark.parametrize(("k", "n"), [(1, 10), (37, 50), (990, 1000), (500, 1000)])
def test_clopper_pearson_lower_solves_its_defining_equation(k, n):
    alpha = 0.001
    p = clopper_pearson_lower(k, n, alpha)
    # the lower bound is the p at which seeing >= k successes has probability exactly alpha
    assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    assert 0 < p < k / n


def test_clopper_pearson_all_successes_and_none():
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    with pytest.raises(ValueError, match="successes <= trials"):
        clopper_pearson_lower(5, 4, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(1, 4, 1.5)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)


def test_constant_classifier_certifies_the_closed_form_radius():
    sigma, n, alpha = 0.5, 200, 0.001
    x, _ = synthetic_tensors(6, num_classes=3)
    y = torch.tensor([2, 2, 2, 0, 1, 2])
    torch.manual_seed(0)
    res = smooth_certify(ConstantClassifier(3, label=2), x, y, sigma=sigma, n0=20, n=n, alpha=alpha, progress=False)
    expected = sigma * norm.ppf(alpha ** (1 / n))
    assert res.predictions == [2] * 6
    assert res.radii == pytest.approx([expected] * 6, rel=1e-9)
    assert res.abstentions == 0
    assert res.accuracy_at(0.0) == pytest.approx(4 / 6)
    assert res.accuracy_at(expected) == pytest.approx(4 / 6)
    assert res.accuracy_at(expected + 1e-6) == 0.0
    assert res.samples == 6 * (20 + n)


def test_too_few_samples_abstain():
    # alpha ** (1 / n) < 1/2 for n = 5: even unanimous votes cannot certify anything
    x, y = synthetic_tensors(4, num_classes=3)
    res = smooth_certify(ConstantClassifier(3, 0), x, y, sigma=0.25, n0=5, n=5, alpha=0.001, progress=False)
    assert res.predictions == [ABSTAIN] * 4
    assert res.radii == [0.0] * 4
    assert res.abstentions == 4
    assert res.accuracy_at(0.0) == 0.0


def test_sample_counts_sum_to_n_whatever_the_batching():
    model = TinyCNN(num_classes=3).eval()
    x, _ = synthetic_tensors(5, num_classes=3)
    for batch_size in (1, 7, 64, 1000):
        counts = sample_counts(model, x, 33, 0.2, batch_size, 3)
        assert counts.shape == (5, 3)
        assert counts.sum(1).tolist() == [33] * 5


def test_noise_changes_votes_of_a_real_model():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).eval()
    x, _ = synthetic_tensors(8, num_classes=3)
    counts = sample_counts(model, x, 200, 1.0, 256, 3)
    assert (counts.max(1).values < 200).any()  # large noise flips some votes


def test_certified_accuracy_counts_abstentions_as_wrong():
    assert certified_accuracy([0, 1, 2], [0, 1, ABSTAIN], [0.5, 0.1, 0.0], 0.0) == pytest.approx(2 / 3)
    assert certified_accuracy([0, 1, 2], [0, 2, 2], [0.5, 0.9, 0.9], 0.2) == pytest.approx(2 / 3)


@pytest.mark.gpu
def test_smoothing_on_cuda_certifies_the_closed_form_radius():
    sigma, n, alpha = 0.5, 200, 0.001
    x, _ = synthetic_tensors(6, num_classes=3)
    y = torch.tensor([2, 2, 2, 0, 1, 2])
    model = ConstantClassifier(3, label=2).cuda()
    res = smooth_certify(model, x.cuda(), y.cuda(), sigma=sigma, n0=20, n=n, alpha=alpha, progress=False)
    assert res.predictions == [2] * 6
    assert res.radii == pytest.approx([sigma * norm.ppf(alpha ** (1 / n))] * 6, rel=1e-9)
    counts = sample_counts(TinyCNN(num_classes=3).cuda().eval(), x.cuda(), 33, 0.2, 7, 3)
    assert counts.sum(1).tolist() == [33] * 6


@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 10), (5, 10), (37, 50), (99, 100), (100, 100), (1000, 1000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_lower_is_the_beta_quantile(k, n, alpha):
    # the one-sided bound is the alpha quantile of Beta(k, n - k + 1)
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12, abs=1e-15)


def test_clopper_pearson_lower_grows_with_successes_and_confidence_costs():
    bounds = [clopper_pearson_lower(k, 100, 0.001) for k in range(0, 101, 10)]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    assert clopper_pearson_lower(90, 100, 0.001) < clopper_pearson_lower(90, 100, 0.05) < 0.9
    assert clopper_pearson_lower(900, 1000, 0.001) > clopper_pearson_lower(90, 100, 0.001)  # more samples, tighter


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (50, 100), (97, 100), (10, 10), (1, 1000)])
def test_wilson_interval_properties(k, n):
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # the interval for the failures is the mirror image of the one for the successes
    mlo, mhi = wilson_interval(n - k, n)
    assert (lo, hi) == pytest.approx((1 - mhi, 1 - mlo), abs=1e-12)
    # wider at a higher confidence, narrower with more trials at the same proportion
    wlo, whi = wilson_interval(k, n, confidence=0.99)
    assert wlo <= lo and whi >= hi and whi - wlo > hi - lo
    nlo, nhi = wilson_interval(10 * k, 10 * n)
    assert nhi - nlo < hi - lo


def test_wilson_interval_matches_its_closed_form():
    k, n, z = 37, 120, norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no trials: no information


def test_constant_classifier_radius_is_sigma_times_the_normal_quantile_of_the_beta_bound():
    sigma, n, alpha = 0.25, 500, 0.01
    x, _ = synthetic_tensors(3, num_classes=3)
    torch.manual_seed(0)
    res = smooth_certify(
        ConstantClassifier(3, label=1),
        x,
        torch.ones(3, dtype=torch.long),
        sigma=sigma,
        n0=10,
        n=n,
        alpha=alpha,
        progress=False,
    )
    p_lower = beta.ppf(alpha, n, 1)  # every vote for the label: k = n
    assert res.radii == pytest.approx([sigma * norm.ppf(p_lower)] * 3, rel=1e-9)
    assert res.predictions == [1, 1, 1] and res.accuracy_at(0.0) == 1.0


@pytest.mark.parametrize(("key", "value"), [("n0", 0), ("n", 0), ("batch_size", 0), ("sigma", 0.0)])
def test_smooth_certify_refuses_bad_settings(key, value):
    kwargs = {"sigma": 0.25, "n0": 5, "n": 5, "batch_size": 8, key: value}
    with pytest.raises(harden.PolicyError, match=key):
        smooth_certify(ConstantClassifier(3, 0), *synthetic_tensors(2), progress=False, **kwargs)


class NaNWhereBright(torch.nn.Module):
    """Logits [0, 1] (class 1) where the mean pixel is below 0.5, all-NaN (argmax: class 0) above."""

    def forward(self, x):
        out = torch.tensor([0.0, 1.0]).repeat(x.shape[0], 1)
        bright = x.flatten(1).mean(1) > 0.5
        return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)


def test_non_finite_logits_cast_no_vote():
    torch.manual_seed(0)
    x = torch.cat([torch.full((1, 1, 8, 8), 0.1), torch.full((1, 1, 8, 8), 0.9)])
    # sigma 0.01 on 64 pixels moves the mean by 0.00125 per standard deviation: never across 0.5
    counts = sample_counts(NaNWhereBright(), x, 20, 0.01, 8, 2)
    assert counts.tolist() == [[0, 20], [0, 0]]
    res = smooth_certify(
        NaNWhereBright(), x, torch.tensor([1, 0]), sigma=0.01, n0=10, n=20, alpha=0.001, batch_size=8, progress=False
    )
    assert res.predictions == [1, ABSTAIN] and res.radii[1] == 0.0
