"""harden.attacks.invariance_examples: label-changing invariance examples (Tramèr et al. 2020's construction)."""

import torch
from torch import nn

from harden.attacks.base import AttackEnv
from harden.attacks.invariance import rotate_shift
from harden.attacks.invariance_examples import InvarianceExamples, affine_theta, apply_affine
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy


def _digit_like(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 12, 12)
    x[:, :, 3:9, 3:9] = torch.rand(n, 1, 6, 6, generator=g)
    return x


def test_affine_matches_rotate_shift_and_inverts():
    x = torch.rand(3, 1, 10, 10)
    theta = affine_theta(20.0, 1.0, -2.0, 10, 10)
    assert torch.allclose(apply_affine(x, theta), rotate_shift(x, 20.0, 1.0, -2.0), atol=1e-6)
    # an integer shift is undone exactly away from the border
    shifted = apply_affine(x, affine_theta(0.0, 2.0, 1.0, 10, 10))
    back = apply_affine(shifted, torch.linalg.inv(affine_theta(0.0, 2.0, 1.0, 10, 10)))
    # two float32 resamplings, each within 2 * 64 u of exact per pixel (the derivation in the next test)
    assert float((back[..., 2:-2, 2:-2] - x[..., 2:-2, 2:-2]).abs().max()) <= 256 * 2.0**-24


def test_finds_the_transformed_twin_of_another_class_and_aligns_it_back():
    x = _digit_like(2, seed=0)
    y = torch.tensor([0, 1])
    # the pool holds a shifted copy of x[0] labelled 1 and a shifted copy of x[1] labelled 0
    twins = torch.cat([rotate_shift(x[:1], 0.0, 1.0, 0.0), rotate_shift(x[1:], 0.0, -1.0, 1.0)])
    atk = InvarianceExamples(ThreatModel(eps=1.0), {"angles": 1, "shifts": 3, "max_shift": 1.0})
    atk.pool = (torch.cat([twins, _digit_like(6, seed=5)]), torch.tensor([1, 0, 0, 0, 0, 1, 1, 1]))
    src = atk.sources(x, y)
    assert src.label.tolist() == [1, 0]
    assert bool(src.valid.all())
    # The distance. sources() computes d2 = |g|^2 + |p|^2 - 2 g.p in float32 (g the input under the
    # twin's shift, p the twin), a cancellation: d2 is near 0 while each term is near T = |g|^2 + |p|^2
    # (about 20 here). Each sum has n = 144 products; whatever the order of summation (BLAS blocking,
    # FMA or not) each is off by at most gamma_n = n u / (1 - n u) of the sum of its terms' magnitudes,
    # u = 2^-24 (float32 rounding): |g|^2 by gamma_n |g|^2, |p|^2 by gamma_n |p|^2, 2 g.p by
    # 2 gamma_n |g||p| <= gamma_n T; the two additions and the square root add at most 4u T. So
    # d2 <= r^2 + (2 gamma_n + 4u) T, with r the exact distance between the float32 images (computed
    # in float64 below: 0 when both resamplings round alike). The bound is about 0.02; the distance
    # printed 0 on an AMD EPYC and 1.38e-3 on an Intel Xeon (another summation order, same bound).
    # The next other-class pool image is about 3 away, so the bound still tells the twin apart.
    u, n = 2.0**-24, x[0].numel()
    gamma_n = n * u / (1 - n * u)
    shifted = (
        torch.cat(
            [
                apply_affine(x, affine_theta(0.0, 1.0, 0.0, 12, 12))[:1],
                apply_affine(x, affine_theta(0.0, -1.0, 1.0, 12, 12))[1:],
            ]
        )
        .double()
        .flatten(1)
    )
    twin = twins.double().flatten(1)
    r2 = ((shifted - twin) ** 2).sum(1)
    total = (shifted**2).sum(1) + (twin**2).sum(1)
    bound = torch.sqrt(r2 + (2 * gamma_n + 4 * u) * total)
    assert bool((src.distance.double() <= bound).all()), (src.distance, bound)
    others = atk.pool[0][2:].double().flatten(1)
    assert float(torch.cdist(shifted, others).min()) > 10 * float(bound.max())
    # Aligned back onto the input. Each resampling (the twin's shift, then its exact inverse)
    # computes a sample coordinate from float32 grid values within 64 u pixels of the exact integer
    # shift (the base grid, the matrix product and the unnormalization ((c + 1) W - 1) / 2 with
    # W = 12: a few roundings each, scaled by W / 2 = 6); bilinear weights move by as much per
    # axis, and neighbouring pixels differ by at most 1, so each pixel moves by at most 2 * 64 u per
    # resampling: 256 u (1.5e-5) for the two.
    assert float((src.x - x).abs().max()) <= 256 * u


def test_examples_stay_in_the_ball_and_change_the_label():
    x, y = synthetic_tensors(32, seed=3)
    for norm, eps in [("linf", 0.3), ("l2", 1.5)]:
        atk = InvarianceExamples(ThreatModel(norm=norm, eps=eps), {"angles": 3, "shifts": 3})
        ex = atk.examples(x, y)
        delta = (ex.x - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-5
        assert bool((ex.label != y)[ex.valid].all())
        assert float(ex.x.min()) >= 0.0 and float(ex.x.max()) <= 1.0
        assert float(delta.abs().sum()) > 0


def test_a_pool_of_one_class_builds_nothing_and_counts_nothing():
    x = torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    atk = InvarianceExamples(ThreatModel(eps=0.3), {"angles": 1, "shifts": 1})
    right, counted = atk.score(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), x, y)
    assert not bool(counted.any()) and not bool(right.any())
    assert torch.equal(atk(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), x, y), x)


class _PoolOracle(nn.Module):
    """Answers the label of the nearest pool image: right on every unprojected example."""

    def __init__(self, px: torch.Tensor, py: torch.Tensor, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("px", px.flatten(1))
        self.py = py
        self.n = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = torch.cdist(x.flatten(1), self.px).argmin(1)
        return nn.functional.one_hot(self.py[j], self.n).float()


def test_score_is_agreement_with_the_new_label():
    x = _digit_like(6, seed=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    pool_x, pool_y = _digit_like(30, seed=7), torch.arange(30) % 3
    atk = InvarianceExamples(ThreatModel(eps=1.0), {"angles": 1, "shifts": 1})
    atk.pool = (pool_x, pool_y)
    right, counted = atk.score(_PoolOracle(pool_x, pool_y, 3), x, y)  # eps 1: the example is the neighbour
    assert bool(counted.all()) and bool(right.all())
    constant = _PoolOracle(pool_x[:1], pool_y[:1], 3)  # always answers class 0
    right, _ = atk.score(constant, x, y)
    labels = atk.sources(x, y).label
    assert torch.equal(right, labels == 0)


def test_prepare_takes_the_training_split_as_pool():
    bundle = synthetic_bundle()
    atk = InvarianceExamples(ThreatModel(eps=0.3), {"pool_size": 40})
    atk.prepare(AttackEnv(policy=tiny_policy(), bundle=bundle))
    assert atk.pool is not None and atk.pool[0].shape[0] == 40 and atk.pool[1].dtype == torch.long


def test_examples_can_have_their_own_linf_radius_and_score_both_labels():
    torch.manual_seed(0)
    x, y = synthetic_tensors(12, seed=4)
    atk = InvarianceExamples(ThreatModel(norm="l2", eps=0.5), {"angles": 3, "shifts": 1, "eps": 0.35})
    ex = atk.examples(x, y)
    dev = (ex.x - x).abs().flatten(1).amax(1)
    assert float(dev.max()) <= 0.35 + 1e-6  # l_inf 0.35 whatever the threat's norm (float32 rounding)
    model = TinyCNN(num_classes=3).eval()
    new, counted = atk.score(model, x, y)
    kept, counted2 = atk.score_source(model, x, y)
    assert torch.equal(counted, counted2)
    assert not bool((new & kept).any())  # t != y: no answer is both
