"""harden.objectives.mi_estimator: the per-example Donsker-Varadhan estimate and the stage-1 losses,
each against a hand-written reference of the formula (float64, loops, no shared code)."""

import pytest
import torch
import torch.nn.functional as F
from helpers_mi import dv_reference

from harden.objectives.mi_estimator import (
    MIEstimator,
    adversarial_estimator_loss,
    cos_along_batch,
    natural_estimator_loss,
)

# float64 references: the two computations differ only in summation order, so they agree to
# ~1e-15 relative; 1e-10 leaves room for the logsumexp's and the cosine's own rounding
TOL = {"rtol": 1e-10, "atol": 1e-10}


def estimator(seed=0, chans=1, classes=3, dim=8):
    torch.manual_seed(seed)
    return MIEstimator(chans, classes, dim).double()


def test_mi_is_the_donsker_varadhan_estimate_per_example():
    est = estimator()
    u, z = torch.rand(5, 1, 8, 8, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(est.mi(u, z), dv_reference(est, u, z), **TOL)
        assert est.mi(u[:1], z[:1]).tolist() == [0.0]  # no negatives: no estimate
    assert est.local_features(u).shape == (5, 4, 8)  # two stride-2 convolutions: 8x8 -> 2x2 locations


def _pairs(n, k, seed, dependent):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    u = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    for c in range(k):
        u[labels == c, :, c : c + 2, :] += 0.8  # the image shows its class as a bright band
    z = F.one_hot(labels, k).float() * 4 + 0.1 * torch.randn(n, k, generator=g)
    return u, (z if dependent else z[torch.randperm(n, generator=g)])


@pytest.mark.parametrize("seed", [0, 1])
def test_mi_separates_dependent_from_independent_pairs_on_held_out_pairs(seed):
    def held_out_estimate(dependent):
        u, z = _pairs(128, 5, seed, dependent)
        torch.manual_seed(seed)
        est = MIEstimator(1, 5, dim=16)
        opt = torch.optim.Adam(est.parameters(), 3e-3)
        for _ in range(150):
            opt.zero_grad()
            (-est.mi(u, z).mean()).backward()
            opt.step()
        u2, z2 = _pairs(128, 5, seed + 100, dependent)  # fresh pairs: memorised ones do not count
        with torch.no_grad():
            return float(est.mi(u2, z2).mean())

    dep, ind = held_out_estimate(True), held_out_estimate(False)
    assert dep > ind + 0.5, (dep, ind)


def test_cosine_runs_along_the_batch_of_estimates():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    assert float(cos_along_batch(a, b)) == pytest.approx(10 / 14)
    assert float(cos_along_batch(a, 2 * a)) == pytest.approx(1.0)


def _batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 1)
    ln, la = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    # right on x: 0-5; fooled: 2-7. So W = {2..5}, R = {0, 1}, outside C = {6, 7}
    right = torch.tensor([True] * 6 + [False] * 2)
    fooled = torch.tensor([False] * 2 + [True] * 6)
    return x, x_adv, ln, la, right, fooled


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_natural_estimator_loss_is_the_authors_stage_1_objective():
    est = estimator(seed=1)
    x, _, ln, la, right, fooled = _batch()
    with torch.no_grad():
        i_nat, i_adv = dv_reference(est, x, ln), dv_reference(est, x, la)
        w, r, n_right = [2, 3, 4, 5], [0, 1], 6
        loss_w = 5 * abs(_cos(i_nat[w], i_adv[w])) - float(i_nat[w].sum()) / n_right
        loss_r = 5 * abs(1 - _cos(i_nat[r], i_adv[r])) - float(i_nat[r].sum()) / n_right
        expected = loss_w + 0.5 * loss_r
        got = natural_estimator_loss(est, x, ln, la, right, fooled)
        assert float(got) == pytest.approx(expected, rel=1e-10)
        nobody = natural_estimator_loss(est, x, ln, la, torch.zeros(8, dtype=torch.bool), fooled)
        assert float(nobody) == pytest.approx(-float(i_nat.mean()), rel=1e-10)  # plain MI maximisation


def test_adversarial_estimator_loss_is_the_authors_stage_1_objective():
    est = estimator(seed=2)
    x, x_adv, ln, la, right, fooled = _batch()
    noise = x_adv - x
    with torch.no_grad():
        i_adv, i_nat = dv_reference(est, noise, la), dv_reference(est, noise, ln)
        w, r = [2, 3, 4, 5], [0, 1]
        loss_w = 5 * abs(_cos(i_adv[w], i_nat[w])) - float(i_adv[w].mean())
        loss_r = 8 * abs(1 - _cos(i_nat[r], i_adv[r])) + 0.1 * float(i_adv[r].mean())
        expected = loss_w + 0.5 * loss_r
        got = adversarial_estimator_loss(est, noise, ln, la, right, fooled)
        assert float(got) == pytest.approx(expected, rel=1e-10)
        nobody = adversarial_estimator_loss(est, noise, ln, la, torch.zeros(8, dtype=torch.bool), fooled)
        assert float(nobody) == pytest.approx(-float(i_adv.mean()), rel=1e-10)


def test_stage_1_pushes_the_fooled_examples_vectors_apart():
    """A few stage-1 steps lower |cos| between I_n(x, f(x)) and I_n(x, f(x~)) on the fooled examples."""
    est = estimator(seed=4, dim=16)
    x, _, ln, la, right, fooled = _batch(n=32, seed=5)
    right = torch.ones(32, dtype=torch.bool)
    fooled = torch.arange(32) % 2 == 0
    opt = torch.optim.Adam(est.parameters(), 1e-2)

    def apart():
        with torch.no_grad():
            return abs(_cos(est.mi(x, ln)[fooled], est.mi(x, la)[fooled]))

    before = apart()
    for _ in range(60):
        opt.zero_grad()
        natural_estimator_loss(est, x, ln, la, right, fooled).backward()
        opt.step()
    assert apart() < before / 2, (before, apart())
