"""Helpers shared by the objective tests: one threat model, an objective with its example params, a tiny model."""

import torch

from harden.models import Normalized
from harden.objectives import OBJECTIVES
from harden.policy import ThreatModel
from harden.testing import TinyCNN

THREAT = ThreatModel(norm="linf", eps=0.1, rho=2e-3)


def make_objective(name, **params):
    cls = OBJECTIVES.get(name)
    return cls({**cls.example_params, **params}, THREAT)


def tiny_model():
    torch.manual_seed(0)
    return Normalized(TinyCNN(num_classes=3)).train()
