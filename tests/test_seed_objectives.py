"""The four seed objectives, each tested where its paper makes its claim (issue 4)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harden
from harden.objectives import OBJECTIVES, ObjectiveSet, pgd_view
from harden.objectives.embedding import EmbeddingTap, classifier_module
from harden.objectives.jsigr import jacobian_frobenius_sq, occlusion_saliency, top_q_mask
from harden.objectives.ot_metric import angular_triplet, label_aware_cost
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors

THREAT = ThreatModel(eps=0.1, rho=2e-3)


def _prepare(names_params, model, x, y):
    weighted = [(1.0, OBJECTIVES.get(n)(p, THREAT)) for n, p in names_params]
    objs = ObjectiveSet(model, weighted, x[:1])
    return objs, objs.context(x, y, THREAT)


# --- J-SIGR -----------------------------------------------------------------------------------


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
    est = torch.stack([jacobian_frobenius_sq(logits, xr, 1, create_graph=False) for _ in range(3000)]).mean(0)
    rel = (est / exact - 1).abs()
    assert float(rel.max()) < 0.05, (est, exact)


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


# --- OT metric ------------------------------------------------------------------------------------


def test_label_aware_cost_and_triplet():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = label_aware_cost(e, e, torch.tensor([0, 1]), torch.tensor([0, 1]), gamma=2.0)
    torch.testing.assert_close(c, torch.tensor([[0.0, 3.0], [3.0, 0.0]]))
    # the negative closer than the positive: positive loss
    a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.1]])
    assert float(angular_triplet(a, p, n, torch.tensor([0]), torch.tensor([1]), 0.05)) > 0.9


def test_ot_loss_has_finite_gradients_for_every_parameter_and_uses_invariance_examples():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(12)
    objs, ctx = _prepare([("ot_metric", {"steps": 2, "ce_weight": 0.0, "triplet_weight": 0.0})], model, x, y)
    loss = objs.weighted[0][1].loss(ctx)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert ctx.forward_calls == 3  # clean, PGD view, invariance examples: one forward each
    objs.close()


def test_embedding_tap_defaults_and_named_layers():
    import timm

    r = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    assert classifier_module(r) is r.get_classifier()
    tap = EmbeddingTap(r)
    r(torch.rand(2, 1, 16, 16))
    assert tap.take().shape == (2, r.num_features)
    tap.remove()
    net = TinyCNN(num_classes=3)
    name = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    tap = EmbeddingTap(net, name)
    net(torch.rand(2, 1, 8, 8))
    assert tap.take().dim() == 2
    with pytest.raises(harden.UnknownNameError, match="embedding layer"):
        EmbeddingTap(net, name + "x")
    with pytest.raises(harden.ModelError, match="layer"):
        classifier_module(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_two_embedding_layers_are_refused():
    model, (x, _) = TinyCNN(num_classes=3), synthetic_tensors(4)
    a = OBJECTIVES.get("ot_metric")({"layer": "a"}, THREAT)
    b = OBJECTIVES.get("ot_metric")({"layer": None}, THREAT)
    with pytest.raises(harden.PolicyError, match="one embedding layer"):
        ObjectiveSet(model, [(1.0, a), (1.0, b)], x[:1])


# --- IWD-AT ---------------------------------------------------------------------------------------


def test_iwd_at_trains_on_iwd_examples_within_budget():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8)
    params = {"steps": 3, "clean_weight": 0.0, "fraction": 0.5, "patch_size": 2, "stride": 2}
    objs, ctx = _prepare([("iwd_at", params)], model, x, y)
    obj = objs.weighted[0][1]
    loss = obj.loss(ctx)
    x_iwd, y_iwd, _ = obj.examples(ctx)
    assert x_iwd.shape[0] == 4 and torch.equal(y_iwd, y[:4])
    assert float(harden.ot.iwd(x[:4], x_iwd, k=2, stride=2).max()) <= THREAT.rho * 1.01 + 1e-9
    assert float((x_iwd - x[:4]).abs().max()) > 0
    # same batch through the model in train mode: BatchNorm uses the same batch statistics
    torch.testing.assert_close(loss, F.cross_entropy(model(x_iwd), y_iwd))
    kl = OBJECTIVES.get("iwd_at")({**params, "loss": "kl"}, THREAT)
    assert float(kl.loss(ctx).detach()) >= 0


# --- mixing ---------------------------------------------------------------------------------------


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


def test_jsigr_and_ot_metric_fractions_penalise_a_subset_with_its_own_forward():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, ctx = _prepare([("jsigr", {"fraction": 0.25, "patch": 4})], model, x, y)
    assert not objs.clean_input_grad and not ctx.x.requires_grad
    loss = objs.weighted[0][1].loss(ctx)
    loss.backward()
    assert ctx.forward_calls == 2  # the whole clean batch (CE) and the 4 penalised examples
    assert objs.weighted[0][1].mask(ctx).shape[0] == 4
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    objs, ctx = _prepare([("ot_metric", {"steps": 1, "inv_fraction": 0.25})], model, x, y)
    inv = objs.weighted[0][1].invariance_examples(ctx)
    assert inv.x.shape[0] == 4 and bool((inv.label != y[:4])[inv.valid].all())
    assert torch.isfinite(objs.weighted[0][1].loss(ctx))
    objs.close()
