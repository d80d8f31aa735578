"""harden.objectives.base: Objective's defaults and ObjectiveSet (weights, lazy objectives, one embedding layer, state)."""

import pytest
import torch
from helpers_objectives import THREAT, make_objective, tiny_model

import harden
from harden.objectives import OBJECTIVES, ObjectiveSet
from harden.testing import TinyCNN, synthetic_tensors


def test_objectives_without_state_refuse_a_foreign_one():
    ce = make_objective("ce")
    assert ce.state_dict() == {}
    ce.load_state_dict({})
    with pytest.raises(harden.CheckpointError, match="no saved state"):
        ce.load_state_dict({"natural": {}})


def test_weights_scale_each_part_of_the_total():
    model, (x, y) = tiny_model(), synthetic_tensors(8, num_classes=3)
    objs = ObjectiveSet(model, [(1.0, make_objective("ce")), (0.25, make_objective("ce"))], x[:1])
    total, parts = objs.loss(objs.context(x, y, THREAT))
    torch.testing.assert_close(parts[1], 0.25 * parts[0])
    torch.testing.assert_close(total, parts[0] + parts[1])


def test_every_computes_a_lazy_objective_on_every_nth_step_only():
    model, (x, y) = tiny_model(), synthetic_tensors(8, num_classes=3)
    eager, lazy = make_objective("ce"), make_objective("trades")
    calls = {"loss": 0, "after": 0}
    inner_loss, inner_after = lazy.loss, lazy.after_step
    lazy.loss = lambda ctx: (calls.__setitem__("loss", calls["loss"] + 1), inner_loss(ctx))[1]
    lazy.after_step = lambda ctx: (calls.__setitem__("after", calls["after"] + 1), inner_after(ctx))[1]
    objs = ObjectiveSet(model, [(1.0, eager), (0.5, lazy)], x[:1], every=[1, 3])
    computed = [True, False, False, True, False, False, True]
    for on in computed:
        assert objs.active() == [True, on]
        ctx = objs.context(x, y, THREAT)
        total, parts = objs.loss(ctx)
        assert (float(parts[1].detach()) != 0.0) == on  # the TRADES loss of an untrained model is > 0
        if not on:
            assert torch.equal(total, parts[0])
        objs.after_step(ctx)
    objs.close()
    assert calls == {"loss": 3, "after": 3}
    assert objs.steps_done == 7


def test_every_step_count_survives_state_dict():
    model, (x, _) = tiny_model(), synthetic_tensors(4, num_classes=3)
    pair = [(1.0, make_objective("ce")), (1.0, make_objective("ce"))]
    objs = ObjectiveSet(model, pair, x[:1], every=[1, 4])
    objs.steps_done = 5
    again = ObjectiveSet(model, pair, x[:1], every=[1, 4])
    again.load_state_dict(objs.state_dict())
    assert again.steps_done == 5
    assert again.active() == [True, False]
    again.load_state_dict({"0": {}})  # a checkpoint from before lazy objectives
    assert again.steps_done == 0
    for bad in (torch.tensor(-1), torch.tensor(2.5), torch.tensor([1, 2]), 3):
        with pytest.raises(harden.CheckpointError, match="steps_done"):
            again.load_state_dict({"steps_done": bad})


@pytest.mark.parametrize("every", [[0], [1, 2], [1.5], [2]])
def test_every_is_validated(every):
    model, (x, _) = tiny_model(), synthetic_tensors(4, num_classes=3)
    with pytest.raises(harden.PolicyError, match="every"):
        ObjectiveSet(model, [(1.0, make_objective("ce"))], x[:1], every=every)


def test_two_embedding_layers_are_refused():
    model, (x, _) = TinyCNN(num_classes=3), synthetic_tensors(4)
    a = OBJECTIVES.get("ot_metric")({"layer": "a"}, THREAT)
    b = OBJECTIVES.get("ot_metric")({"layer": None}, THREAT)
    with pytest.raises(harden.PolicyError, match="one embedding layer"):
        ObjectiveSet(model, [(1.0, a), (1.0, b)], x[:1])
