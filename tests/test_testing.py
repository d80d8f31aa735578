"""harden.testing: the tiny models, data and policies, and the contract harness catching broken plugins."""

import torch

import harden.data
from harden.attacks.fgsm import FGSM
from harden.models import Normalized
from harden.objectives.ce import CE
from harden.policy import ThreatModel
from harden.testing import (
    TinyCNN,
    check_attack,
    check_objective,
    synthetic_bundle,
    synthetic_tensors,
)

# --------------------------------------------------------------------------- models, data, policies


def test_synthetic_data_is_the_data_modules():
    assert synthetic_tensors is harden.data.synthetic_tensors and synthetic_bundle is harden.data.synthetic_bundle
    x1, y1 = synthetic_tensors(12, seed=3)
    x2, y2 = synthetic_tensors(12, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # seeded, whatever the global RNG
    assert not torch.equal(x1, synthetic_tensors(12, seed=4)[0])


def test_the_harness_leaves_the_callers_rng_and_model_alone():
    torch.manual_seed(123)
    model = Normalized(TinyCNN(num_classes=3)).train()
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_attack(FGSM, ThreatModel(norm="l2", eps=1.0))
    check_objective(CE, model=model)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters()) and model.training
