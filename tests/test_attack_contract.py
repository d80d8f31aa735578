"""harden.testing: the tiny models, data and policies, and the contract harness catching broken plugins."""

import random

import pytest
import torch
import torch.nn.functional as F

from harden.attacks.base import Attack, AttackParams
from harden.attacks.fgsm import FGSM
from harden.policy import ThreatModel
from harden.testing import (
    check_attack,
)

# --------------------------------------------------------------------------- models, data, policies


@pytest.mark.parametrize("thing", [FGSM(ThreatModel()), int, "fgsm"])
def test_the_attack_harness_wants_an_attack_class(thing):
    with pytest.raises(AssertionError, match=r"subclass of harden\.Attack"):
        check_attack(thing)


class Broken(Attack):
    """A one-step FGSM-like attack, broken in one way per subclass."""

    name = "broken"
    Params = AttackParams

    def perturb(self, model, x, y):
        return x + self.threat.eps * torch.randn_like(x).sign()


class InPlace(Broken):
    def perturb(self, model, x, y):
        return x.add_(0.01).clamp_(0, 1)  # x shares the caller's storage


class Unseeded(Broken):
    def perturb(self, model, x, y):
        return x + self.threat.eps * random.uniform(-1.0, 1.0)  # Python's RNG: not torch's seed


class LeavesGrads(Broken):
    freezes_parameters = False  # opted out of the base class's freezing, so it can leave gradients

    def perturb(self, model, x, y):
        F.cross_entropy(model(x), y).backward()  # onto the parameters
        return x


class FloatScore(Broken):
    def score(self, model, x, y):
        right, counted = super().score(model, x, y)
        return right.float(), counted


class RightButUncounted(Broken):
    def score(self, model, x, y):
        right, _ = super().score(model, x, y)
        return torch.ones_like(right), torch.zeros_like(right)


class NeverRunsTheModel(Broken):
    def score(self, model, x, y):
        n = x.shape[0]
        return torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)


class TrainModeForward(Broken):
    def perturb(self, model, x, y):
        model.train()  # BatchNorm would now use (and update) batch statistics
        with torch.no_grad():
            model(x)
        return x


class Unbounded(Broken):
    bounded = False  # not projected onto the ball: then it must stay in [0, 1] only

    def perturb(self, model, x, y):
        return x + 0.5


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (InPlace, "modified in place"),
        (Unseeded, "same output under the same torch seed"),
        (LeavesGrads, "no parameter gradients"),
        (FloatScore, "as a bool tensor"),
        (RightButUncounted, "scored right to count"),
        (NeverRunsTheModel, "run the model"),
        (TrainModeForward, "in eval mode"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_the_attack_harness_names_what_is_broken(cls, match):
    with pytest.raises(AssertionError, match=match) as info:
        check_attack(cls)
    assert str(info.value).startswith("broken (linf, eps=0.1): ")


def test_the_attack_harness_passes_a_sound_unbounded_attack():
    check_attack(Unbounded)
    check_attack(Broken)
