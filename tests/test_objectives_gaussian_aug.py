"""harden.objectives.gaussian_aug: cross-entropy under unclipped Gaussian noise, drawn once per batch and sigma."""

import pytest
import torch
import torch.nn.functional as F

import harden
from harden.objectives import OBJECTIVES, BatchContext, ObjectiveSet
from harden.policy import ThreatModel
from harden.testing import TinyMLP, synthetic_tensors

THREAT = ThreatModel(norm="l2", eps=0.5)


def test_loss_is_cross_entropy_on_the_noisy_batch():
    torch.manual_seed(0)
    model = TinyMLP(num_classes=3)
    x, y = synthetic_tensors(16)
    torch.manual_seed(3)
    loss = OBJECTIVES.get("gaussian_aug")({"sigma": 0.5}, THREAT).loss(BatchContext(model, x, y, THREAT))
    torch.manual_seed(3)
    noisy = x + 0.5 * torch.randn_like(x)
    torch.testing.assert_close(loss, F.cross_entropy(model(noisy), y))
    assert float(noisy.min()) < 0.0 and float(noisy.max()) > 1.0  # not clipped to [0, 1], as in the paper


def test_terms_with_one_sigma_share_the_noisy_batch():
    torch.manual_seed(0)
    model = TinyMLP(num_classes=3)
    x, y = synthetic_tensors(8)
    for sigmas, forwards in (((0.5, 0.5), 1), ((0.5, 0.25), 2)):
        weighted = [(1.0, OBJECTIVES.get("gaussian_aug")({"sigma": s}, THREAT)) for s in sigmas]
        objs = ObjectiveSet(model, weighted, x[:1])
        ctx = objs.context(x, y, THREAT)
        _, parts = objs.loss(ctx)
        assert ctx.forward_calls == forwards
        if forwards == 1:
            torch.testing.assert_close(parts[0], parts[1])


@pytest.mark.parametrize("sigma", [0.0, -1.0, 11.0])
def test_sigma_is_validated(sigma):
    with pytest.raises(harden.PolicyError, match="sigma"):
        OBJECTIVES.get("gaussian_aug")({"sigma": sigma}, THREAT)
