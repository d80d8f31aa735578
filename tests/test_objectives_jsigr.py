"""harden.objectives.jsigr: eval-mode penalties (each example its own), the saliency mask and the matching variant."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harden.objectives import OBJECTIVES, BatchContext, ObjectiveSet
from harden.objectives.jsigr import jacobian_frobenius_sq, occlusion_saliency, saliency_matching, top_q_mask
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors

THREAT = ThreatModel(eps=0.1)


class BNNet(nn.Module):
    """Conv, BatchNorm, linear: in train mode the batch statistics couple the examples."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
        )

    def forward(self, x):
        return self.body(x)


def _input_gradient(obj_params, x, y, model):
    objs = ObjectiveSet(model, [(1.0, OBJECTIVES.get("jsigr")(obj_params, THREAT))], x[:1])
    ctx = objs.context(x, y, THREAT)
    objs.weighted[0][1].loss(ctx)
    key = ("jsigr-penalised", x.shape[0])
    out = ctx._logits[key]
    x_in = ctx._memo[key]
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), x_in)
    return g


def test_each_examples_penalty_ignores_the_rest_of_the_batch():
    torch.manual_seed(0)
    model = BNNet().train()
    x, y = synthetic_tensors(6, seed=1)
    running = model.body[1].running_mean.clone()
    # the clean CE forward (train mode) moves the running statistics first: the penalty then uses
    # them as constants. Compare at equal running statistics: one frozen copy of the model each
    frozen = copy.deepcopy(model)
    frozen.body[1].momentum = 0.0
    g = _input_gradient({"lambda_j": 0.0, "patch": 4}, x, y, copy.deepcopy(frozen))
    x2 = x.clone()
    x2[1:] = torch.rand_like(x2[1:])  # every other example changes
    g2 = _input_gradient({"lambda_j": 0.0, "patch": 4}, x2, y, copy.deepcopy(frozen))
    # eval-mode BatchNorm: example 0's gradient is a function of example 0 only (float32, same ops)
    torch.testing.assert_close(g[0], g2[0], rtol=0, atol=0)
    assert model.training  # the penalty's forward left the modes as they were
    _input_gradient({"lambda_j": 0.0, "patch": 4}, x, y, model)
    # the penalty's forward moved no running statistic (the clean CE forward in train mode did)
    ctx = BatchContext(model, x, y, THREAT)
    before = model.body[1].running_mean.clone()
    ctx.forward_eval("k", x)
    assert torch.equal(model.body[1].running_mean, before) and not torch.equal(before, running)


def test_train_mode_would_have_coupled_the_examples():
    """The reason for eval mode: with batch statistics, example 0's gradient moves with the others."""
    torch.manual_seed(0)
    model = BNNet().train()
    x, y = synthetic_tensors(6, seed=1)

    def grad0(batch):
        xr = batch.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xr), y, reduction="sum"), xr)
        return g[0]

    x2 = x.clone()
    x2[1:] = torch.rand_like(x2[1:])
    assert not torch.allclose(grad0(x), grad0(x2))


def test_default_saliency_has_49_cells_on_28_pixels():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    objs = ObjectiveSet(model, [(1.0, OBJECTIVES.get("jsigr")({}, THREAT))], x[:1])
    sal = objs.weighted[0][1].saliency(objs.context(x, y, THREAT))
    cells = sal[0, 0, ::4, ::4]  # 4-px cells: 7 x 7
    assert cells.shape == (7, 7) and math.ceil(28 / 7) == 4
    torch.testing.assert_close(sal[0, 0], cells.repeat_interleave(4, 0).repeat_interleave(4, 1))


def test_mask_keeps_whole_cells_at_the_threshold_and_at_least_q():
    sal = occlusion_saliency(TinyCNN(num_classes=3), torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]), 4)
    mask = top_q_mask(sal, 0.2)
    share = mask.flatten(1).mean(1)
    assert bool((share >= 0.2).all())
    # 4-px cells: the mask is constant on each cell (no cell split by pixel order)
    for i in range(3):
        cells = mask[i, 0].unfold(0, 4, 4).unfold(1, 4, 4)
        assert bool(((cells == 0) | (cells == 1)).all()) and bool((cells.amin((-1, -2)) == cells.amax((-1, -2))).all())


@pytest.mark.parametrize("selective", ["mask", "match", "none"])
def test_each_selective_term_adds_its_own_gradient(selective):
    def grads(lambda_s):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=3)
        x, y = synthetic_tensors(8, seed=2)
        params = {"patch": 4, "selective": selective, "lambda_j": 0.0, "lambda_s": lambda_s}
        objs = ObjectiveSet(model, [(1.0, OBJECTIVES.get("jsigr")(params, THREAT))], x[:1])
        objs.weighted[0][1].loss(objs.context(x, y, THREAT)).backward()
        return [p.grad.clone() for p in model.parameters() if p.dim() > 1]

    with_term, without = grads(1.0), grads(0.0)  # the same clean CE in both: the difference is the term
    assert all(torch.isfinite(g).all() for g in with_term)
    # without the term the grads would differ by rounding only: <= ~10 u max|g| ~ 6e-8 (|g| <= 0.1)
    assert all(float((a - b).abs().max()) > 1e-6 for a, b in zip(with_term, without, strict=True))


def test_black_background_is_never_salient_even_on_a_confident_model():
    """Occluding black with black changes nothing: those pixels score 0 and stay out of the mask."""

    class Confident(nn.Module):
        def forward(self, x):  # class 0's logit grows with the centre's brightness: p(0) rounds to 1
            centre = x[:, :, 2:6, 2:6].sum((1, 2, 3))
            return torch.stack([3 * centre, torch.zeros_like(centre), torch.zeros_like(centre)], 1)

    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0  # a bright square on black
    sal = occlusion_saliency(Confident(), x, torch.tensor([0, 0]), 2)
    probs = torch.softmax(Confident()(x), 1)
    assert float(probs[0, 0]) == 1.0  # logit 48 vs 0: p(y) rounds to 1 in float32 (1 - 2e-21)
    assert float(torch.log_softmax(Confident()(x), 1)[0, 0]) == 0.0  # and so does its log
    assert float(sal[:, :, :2].abs().max()) == 0.0  # black rows: nothing changed
    assert float(sal[:, :, 2:6, 2:6].min()) > 0  # the logit margin still moves on a saturated softmax
    mask = top_q_mask(sal, 0.5)  # q asks for 32 pixels; only the 16 of the square moved anything
    assert mask.flatten(1).sum(1).tolist() == [16.0, 16.0]
    assert bool((mask[:, :, 2:6, 2:6] == 1).all())


def test_saliency_matching_is_zero_when_the_gradient_follows_the_saliency_and_positive_otherwise():
    s = torch.rand(2, 1, 6, 6)
    assert saliency_matching(3 * s, s).abs().max() < 1e-6  # float32 normalisations: a few ulps
    assert bool((saliency_matching(s.flip(-1), s) > 1e-3).all())


def _prepare(names_params, model, x, y):
    weighted = [(1.0, OBJECTIVES.get(n)(p, THREAT)) for n, p in names_params]
    objs = ObjectiveSet(model, weighted, x[:1])
    return objs, objs.context(x, y, THREAT)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))

    def forward(self, x):
        return self.body(x)


def test_jacobian_estimate_matches_the_exact_frobenius_norm():
    torch.manual_seed(0)
    net = SmallNet()
    x = torch.rand(3, 1, 4, 4)
    exact = torch.stack([torch.autograd.functional.jacobian(lambda z: net(z[None])[0], xi).pow(2).sum() for xi in x])
    xr = x.clone().requires_grad_(True)
    logits = net(xr)
    s = torch.stack([jacobian_frobenius_sq(logits, xr, 1, create_graph=False) for _ in range(3000)])
    est = s.mean(0)
    # unbiased Hutchinson estimate: the mean of 3000 draws is ~normal around the exact value with standard
    # error std / sqrt(3000); 4 standard errors is a two-sided 6e-5 bound (seeded: the CPU RNG is
    # platform-independent)
    assert ((est - exact).abs() <= 4 * s.std(0) / 3000**0.5).all(), (est, exact)


def test_jacobian_estimate_is_differentiable_in_the_parameters():
    net = SmallNet()
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    jacobian_frobenius_sq(net(x), x).sum().backward()
    # the Jacobian does not depend on the last bias; every weight and the hidden bias get a gradient
    for p in (net.body[1].weight, net.body[1].bias, net.body[3].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0


def test_occlusion_saliency_finds_the_only_pixels_that_matter():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
        net[1].weight[0, 0] = 5.0  # class 0 depends on pixel (0, 0) only
    x = torch.ones(1, 1, 4, 4)
    sal = occlusion_saliency(net, x, torch.tensor([0]), 2)
    assert float(sal[0, 0, 0, 0]) > 0.4 and float(sal[0, 0, 2:, 2:].abs().max()) == 0.0
    mask = top_q_mask(sal, 0.25)
    assert mask[0, 0, :2, :2].sum() == 4 and mask.sum() == 4


def test_jsigr_lambdas_zero_is_clean_ce_and_terms_add():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8)
    _, ctx = _prepare([("jsigr", {"lambda_j": 0.0, "lambda_s": 0.0})], model, x, y)
    plain = OBJECTIVES.get("jsigr")({"lambda_j": 0.0, "lambda_s": 0.0}, THREAT).loss(ctx)
    torch.testing.assert_close(plain, F.cross_entropy(model(x), y))
    _, ctx = _prepare([("jsigr", {})], model, x, y)
    full = OBJECTIVES.get("jsigr")({}, THREAT).loss(ctx)
    assert float(full.detach()) > float(plain.detach())


def test_jsigr_mask_is_computed_once_per_batch_and_leaves_modes():
    model, (x, y) = TinyCNN(num_classes=3).train(), synthetic_tensors(8)
    obj = OBJECTIVES.get("jsigr")({"patch": 4}, THREAT)
    _, ctx = _prepare([("jsigr", {"patch": 4})], model, x, y)
    m1 = obj.mask(ctx)
    assert obj.mask(ctx) is m1 and model.training
    assert m1.shape == (8, 1, 8, 8) and set(m1.unique().tolist()) <= {0.0, 1.0}


def test_jsigr_fraction_penalises_a_subset_with_its_own_forward():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, ctx = _prepare([("jsigr", {"fraction": 0.25, "patch": 4})], model, x, y)
    assert not objs.clean_input_grad and not ctx.x.requires_grad
    loss = objs.weighted[0][1].loss(ctx)
    loss.backward()
    assert ctx.forward_calls == 2  # the whole clean batch (CE) and the 4 penalised examples
    assert objs.weighted[0][1].mask(ctx).shape[0] == 4
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    objs.close()
