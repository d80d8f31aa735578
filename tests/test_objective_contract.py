"""harden.testing: the tiny models, data and policies, and the contract harness catching broken plugins."""

import random

import pytest
import torch.nn.functional as F

from harden.attacks.fgsm import FGSM
from harden.objectives import Objective, pgd_view
from harden.testing import (
    check_objective,
)

# --------------------------------------------------------------------------- models, data, policies


def test_the_objective_harness_wants_an_objective_class():
    with pytest.raises(AssertionError, match=r"subclass of harden\.Objective"):
        check_objective(FGSM)


class BrokenObjective(Objective):
    """Cross-entropy on the clean batch, broken in one way per subclass."""

    name = "broken_objective"

    def loss(self, ctx):
        return F.cross_entropy(ctx.logits(None), ctx.y)


class OneParameterOnly(BrokenObjective):
    def loss(self, ctx):
        return next(ctx.model.parameters()).square().sum() + 1.0


class LeavesEvalMode(BrokenObjective):
    def loss(self, ctx):
        ctx.model.eval()
        return super().loss(ctx)


class UndeclaredView(BrokenObjective):
    def loss(self, ctx):
        return F.cross_entropy(ctx.logits(pgd_view(1)), ctx.y)


class ForgetfulState(BrokenObjective):
    def __init__(self, params, threat):
        super().__init__(params, threat)
        self.steps = 0

    def after_step(self, ctx):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        pass  # forgets it


class UnsavableState(BrokenObjective):
    def state_dict(self):
        return {"optimizer": object()}


class RandomLoss(BrokenObjective):
    def loss(self, ctx):
        return super().loss(ctx) * random.uniform(1.0, 2.0)


class NegativeLoss(BrokenObjective):
    def loss(self, ctx):
        return -super().loss(ctx)


class NaNLoss(BrokenObjective):
    def loss(self, ctx):
        return super().loss(ctx) * float("nan")


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (OneParameterOnly, "expected a gradient to reach every parameter"),
        (LeavesEvalMode, "modes left as they were"),
        (UndeclaredView, "views read to be the views declared"),
        (ForgetfulState, "restore the state"),
        (UnsavableState, "a checkpoint can hold"),
        (RandomLoss, "same loss under the same torch seed"),
        (NegativeLoss, "loss > 0"),
        (NaNLoss, "finite loss"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_the_objective_harness_names_what_is_broken(cls, match):
    with pytest.raises(AssertionError, match=match) as info:
        check_objective(cls)
    assert str(info.value).startswith("broken_objective: ")


def test_the_objective_harness_passes_a_sound_objective():
    check_objective(BrokenObjective)
