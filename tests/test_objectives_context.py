"""harden.objectives.context: views computed once per batch and shared, cached logits, BatchNorm statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_objectives import THREAT, make_objective, tiny_model
from torch import nn

from harden.objectives import OBJECTIVES, BatchContext, Objective, ObjectiveSet, View, pgd_view
from harden.testing import TinyCNN, synthetic_tensors


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


@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_bn_statistics_restores_running_stats(momentum):
    from harden.objectives.context import frozen_bn_statistics

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


def _prepare(names_params, model, x, y):
    weighted = [(1.0, OBJECTIVES.get(n)(p, THREAT)) for n, p in names_params]
    objs = ObjectiveSet(model, weighted, x[:1])
    return objs, objs.context(x, y, THREAT)


def test_the_mix_computes_the_pgd_view_once():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8)
    names = [
        ("pgd_at", {"steps": 2}),
        ("mi", {"steps": 2, "ce_weight": 0.0}),
        ("ot_metric", {"steps": 2, "ce_weight": 0.0}),
        ("jsigr", {"patch": 4}),
    ]
    objs, ctx = _prepare(names, model, x, y)
    total, parts = objs.loss(ctx)
    assert len(parts) == 4 and torch.isfinite(total)
    assert ctx.view_calls == 1 and list(ctx._views) == [pgd_view(2)]
    total.backward()
    objs.after_step(ctx)
    objs.close()
