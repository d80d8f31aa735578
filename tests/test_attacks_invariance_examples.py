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
    assert torch.allclose(back[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2], atol=1e-5)


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
    assert float(src.distance.max()) < 1e-3
    assert torch.allclose(src.x, x, atol=1e-5)  # aligned back onto the input itself


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
