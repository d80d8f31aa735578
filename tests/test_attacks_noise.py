"""harden.attacks.noise: Gaussian draws inside the ball, weaker than PGD, and stopping once fooled."""

import torch
from torch import nn

from harden.attacks import ATTACKS
from harden.policy import ThreatModel
from harden.testing import synthetic_tensors


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_noise_is_weaker_than_pgd_and_stays_in_ball(trained):
    x, y = synthetic_tensors(128, seed=2)
    threat = ThreatModel(eps=0.15)
    torch.manual_seed(0)
    noisy = ATTACKS.get("noise")(threat, {"samples": 5})(trained, x, y)
    pgd = ATTACKS.get("pgd")(threat, {"steps": 10})(trained, x, y)
    assert (noisy - x).abs().max() <= 0.15 + 1e-6
    assert _acc(trained, pgd, y) < _acc(trained, noisy, y)


def test_noise_l2_has_norm_eps_before_clipping(trained):
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    out = ATTACKS.get("noise")(ThreatModel(norm="l2", eps=0.5), {"samples": 1})(trained, x, y)
    norms = (out - x).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((4,), 0.5), atol=1e-4)


class Counting(nn.Module):
    """Always answers class 1; counts the rows it was asked about."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return torch.nn.functional.one_hot(torch.ones(x.shape[0], dtype=torch.long), 2).float()


def test_noise_queries_only_the_examples_not_yet_fooled():
    x = torch.full((6, 1, 8, 8), 0.5)
    y = torch.tensor([1, 0, 1, 0, 1, 1])  # the model answers 1: examples 1 and 3 are fooled by any draw
    model = Counting()
    ATTACKS.get("noise")(ThreatModel(eps=0.1), {"samples": 4})(model, x, y)
    assert model.rows == [6, 4, 4, 4]  # after the first draw only the four still right are queried
