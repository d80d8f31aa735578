"""Objectives: the contract every registered objective keeps, and the shared batch context."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import harden
from harden.attacks.base import save_modes
from harden.models import Normalized
from harden.objectives import OBJECTIVES, BatchContext, Objective, ObjectiveSet, View
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors

#: cheap values for the budget parameters an objective may have (applied when its Params has the field)
CHEAP = {"steps": 2, "attack_steps": 2, "restarts": 1, "nproj": 1, "sinkhorn_iters": 20, "iters": 5}
#: per-objective overrides of CHEAP
FAST_PARAMS = {"pgd_at": {"steps": 2}, "trades": {"steps": 2}, "jsigr": {"patch": 4}}

THREAT = ThreatModel(norm="linf", eps=0.1, rho=2e-3)
CONTRACT = pytest.mark.parametrize("name", OBJECTIVES.names())


def make_objective(name, threat=THREAT, **params):
    cls = OBJECTIVES.get(name)
    cheap = {k: v for k, v in CHEAP.items() if k in cls.Params.model_fields}
    return cls({**cheap, **FAST_PARAMS.get(name, {}), **params}, threat)


def tiny_model():
    torch.manual_seed(0)
    return Normalized(TinyCNN(num_classes=3)).train()


def resnet_model():
    torch.manual_seed(0)
    return Normalized(timm.create_model("resnet10t", num_classes=3, in_chans=1)).train()


def loss_and_grads(name, model, x, y, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    obj = make_objective(name)
    objs = ObjectiveSet(model, [(1.0, obj)], x[:1])
    try:
        loss = obj.loss(objs.context(x, y, THREAT))
        loss.backward()
    finally:
        objs.close()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@CONTRACT
@pytest.mark.parametrize(
    ("builder", "shape"), [(tiny_model, (8, 1, 8, 8)), (resnet_model, (4, 1, 16, 16))], ids=["tinycnn", "resnet10t"]
)
def test_finite_scalar_loss_with_gradients_everywhere(name, builder, shape):
    model = builder()
    torch.manual_seed(1)
    x, y = synthetic_tensors(shape[0], size=shape[-1])
    modes = save_modes(model)
    loss, grads = loss_and_grads(name, model, x, y)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    assert loss.item() > 0
    for pname, grad in grads.items():
        assert grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(grad).all(), pname
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    assert save_modes(model) == modes  # the objective's attack left the train modes as they were


@CONTRACT
def test_same_loss_under_the_same_seed(name):
    base = tiny_model()
    x, y = synthetic_tensors(8)
    first, g1 = loss_and_grads(name, copy.deepcopy(base), x, y, seed=5)
    second, g2 = loss_and_grads(name, copy.deepcopy(base), x, y, seed=5)
    assert torch.equal(first, second)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


@CONTRACT
def test_declared_views_are_the_views_used(name):
    model = tiny_model()
    x, y = synthetic_tensors(8)
    obj = make_objective(name)
    ctx = ObjectiveSet(model, [(1.0, obj)], x[:1]).context(x, y, THREAT)
    obj.loss(ctx)
    assert set(ctx._views) == set(obj.views())
    assert ctx.view_calls == len(obj.views())


@CONTRACT
def test_bad_params_raise_policy_error(name):
    with pytest.raises(harden.PolicyError, match="no_such_param"):
        OBJECTIVES.get(name)({"no_such_param": 1}, THREAT)


class SameViewAsPGDAT(Objective):
    """A test objective (not registered) that reads the very view pgd_at uses."""

    name = "same_view"

    def __init__(self, view):
        super().__init__({}, THREAT)
        self._view = view

    def views(self):
        return (self._view,)

    def loss(self, ctx):
        return F.cross_entropy(ctx.logits(self._view), ctx.y, reduction="sum")


class CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyCNN(num_classes=3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.net(x)


def test_context_shares_identical_views():
    model = CountingModel().train()
    x, y = synthetic_tensors(8)
    pgd_at = make_objective("pgd_at", steps=3)
    other = SameViewAsPGDAT(pgd_at.views()[0])
    assert other.views() == pgd_at.views()
    ctx = BatchContext(model, x, y, THREAT)
    a = pgd_at.loss(ctx)
    forwards_after_first = model.forwards
    b = other.loss(ctx)
    assert ctx.view_calls == 1
    assert model.forwards == forwards_after_first  # the logits are cached too
    torch.testing.assert_close(b, a * x.shape[0])


def test_context_computes_distinct_views_separately():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    ctx = BatchContext(model, x, y, THREAT)
    make_objective("pgd_at").loss(ctx)
    make_objective("trades").loss(ctx)
    make_objective("ce").loss(ctx)
    assert ctx.view_calls == 2
    assert len(ctx._views) == 2


def test_view_equality_and_hashing():
    assert View.of("pgd", {"steps": 7, "loss": "kl"}) == View.of("pgd", {"loss": "kl", "steps": 7})
    assert hash(View.of("pgd", {"steps": 7})) == hash(View.of("pgd", {"steps": 7}))
    assert View.of("pgd", {"steps": 7}) != View.of("pgd", {"steps": 8})
    assert View.of("fgsm") == View("fgsm", ())


def test_view_inputs_stay_in_the_threat_model():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    ctx = BatchContext(model, x, y, THREAT)
    view = make_objective("pgd_at").views()[0]
    adv = ctx.view(view)
    assert float((adv - x).abs().max()) <= THREAT.eps + 1e-6
    assert not adv.requires_grad
    assert ctx.view(view) is adv


def test_trades_with_beta_zero_is_clean_ce():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    loss = make_objective("trades", beta=0.0).loss(BatchContext(model, x, y, THREAT))
    reference = F.cross_entropy(model(x), y)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)


def test_trades_kl_term_is_non_negative():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    ce = F.cross_entropy(model(x), y)
    trades = make_objective("trades", beta=6.0).loss(BatchContext(model, x, y, THREAT))
    assert trades >= ce - 1e-6


def test_ce_is_cross_entropy_and_label_smoothing():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    logits = model(x)
    ce = make_objective("ce").loss(BatchContext(model, x, y, THREAT))
    torch.testing.assert_close(ce, F.cross_entropy(logits, y), rtol=0, atol=1e-6)
    smooth = make_objective("ce", label_smoothing=0.2).loss(BatchContext(model, x, y, THREAT))
    torch.testing.assert_close(smooth, F.cross_entropy(logits, y, label_smoothing=0.2), rtol=0, atol=1e-6)


def test_pgd_at_trains_on_adversarial_inputs():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    ctx = BatchContext(model, x, y, THREAT)
    loss = make_objective("pgd_at").loss(ctx)
    (adv,) = ctx._views.values()
    torch.testing.assert_close(loss, F.cross_entropy(model(adv), y), rtol=0, atol=1e-6)
    assert not torch.equal(adv, x)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_bn_statistics_restores_running_stats(momentum):
    from harden.objectives.base import frozen_bn_statistics

    bn = torch.nn.BatchNorm2d(3, momentum=momentum).train()
    bn(torch.randn(4, 3, 5, 5))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = (torch.randn(4, 3, 5, 5) * 3 + 2).requires_grad_(True)
    with frozen_bn_statistics(bn):
        out = bn(x)
    out.square().sum().backward()  # autograd still works through the frozen forward
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert bn.momentum == momentum
    bn(x.detach())  # and updates again afterwards
    assert not torch.equal(bn.running_mean, before[0])


@pytest.mark.parametrize("bn_stats", ["first_forward", "every_forward"])
def test_only_the_first_view_moves_bn_running_stats(bn_stats):
    x, y = synthetic_tensors(16, num_classes=3)
    torch.manual_seed(0)
    model = tiny_model()
    reference = copy.deepcopy(model)
    reference(x)  # one train-mode forward of the clean batch: what `ce` alone would record
    objs = [(1.0, make_objective("ce")), (1.0, make_objective("gaussian_aug", sigma=0.5))]
    mix = ObjectiveSet(model, objs, x[:1], bn_stats=bn_stats)
    ctx = mix.context(x, y, THREAT)
    mix.loss(ctx)[0].backward()
    assert ctx.forward_calls == 2
    same = all(
        torch.equal(a, b)
        for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers(), strict=True)
        if "running" in name
    )
    assert same == (bn_stats == "first_forward")


def test_bn_stats_is_validated():
    with pytest.raises(ValueError, match="bn_stats"):
        BatchContext(tiny_model(), *synthetic_tensors(4, num_classes=3), THREAT, bn_stats="sometimes")


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
