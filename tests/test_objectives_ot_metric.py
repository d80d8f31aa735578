"""harden.objectives.ot_metric: the OT term against POT, the triplet's negatives, and the invariance examples'
radius and label."""

import ot
import pytest
import torch
import torch.nn.functional as F

from harden.objectives import OBJECTIVES, ObjectiveSet
from harden.objectives.ot_metric import angular_triplet, class_ot_loss, label_aware_cost, unbalanced_ot_loss
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors

F64 = torch.float64
THREAT = ThreatModel(eps=0.1)


def _embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    e_clean, e_pert = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(7, 4, generator=g, dtype=F64)
    return e_clean, e_pert, torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 1, 1, 2, 0, 3, 1])


def test_per_class_ot_term_equals_pot_class_by_class():
    e_clean, e_pert, y_clean, y_pert = _embeddings()
    reg = 0.1
    expected, mass = 0.0, 0
    for c in (0, 1, 2):  # class 3 has no clean example: it moves no mass
        ci, pj = y_clean == c, y_pert == c
        cost = 1 - F.normalize(e_clean[ci], dim=1) @ F.normalize(e_pert[pj], dim=1).T
        a = torch.full((int(ci.sum()),), 1 / int(ci.sum()), dtype=F64)
        b = torch.full((int(pj.sum()),), 1 / int(pj.sum()), dtype=F64)
        plan = ot.sinkhorn(a, b, cost, reg, stopThr=1e-14, numItermax=100_000)
        expected += int(ci.sum()) * float((plan * cost).sum())
        mass += int(ci.sum())
    got = class_ot_loss(e_clean, e_pert, y_clean, y_pert, reg, tol=1e-12)
    # both solvers converged far below float64's resolution of the value: only rounding differs
    assert float(got) == pytest.approx(expected / mass, rel=1e-8)


def test_per_class_ot_moves_no_mass_between_classes():
    """Each perturbed embedding sits on the other class's clean one: a label-blind plan would pay 0."""
    e_clean = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    e_pert = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)  # class 0's looks like class 1 and back
    y = torch.tensor([0, 1])
    blind = 1 - F.normalize(e_clean, dim=1) @ F.normalize(e_pert, dim=1).T
    a = torch.full((2,), 0.5, dtype=F64)
    assert float((ot.sinkhorn(a, a, blind, 0.01, stopThr=1e-14) * blind).sum()) == pytest.approx(0.0, abs=1e-6)
    # within each class the only match costs 1 - cos = 1: no mass crosses to the cheap wrong class
    assert float(class_ot_loss(e_clean, e_pert, y, y, 0.01, tol=1e-12)) == pytest.approx(1.0, rel=1e-9)


def test_unbalanced_ot_term_equals_pot():
    e_clean, e_pert, y_clean, y_pert = _embeddings(seed=1)
    cost = label_aware_cost(e_clean, e_pert, y_clean, y_pert, gamma=1.0)
    a = torch.full((6,), 1 / 6, dtype=F64)
    b = torch.full((7,), 1 / 7, dtype=F64)
    plan = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, 0.1, 1.0, numItermax=100_000, stopThr=1e-14)
    got = unbalanced_ot_loss(cost, 0.1, 1.0, tol=1e-12)
    assert float(got) == pytest.approx(float((plan * cost).sum()), rel=1e-7)


def test_an_anchors_own_invariance_example_is_never_its_negative():
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[0.0, 1.0]])  # d(a, p) = 1
    own = torch.tensor([[1.0, 0.01]])  # its own invariance example: almost the anchor, another label
    other = torch.tensor([[-1.0, 0.0]])  # d = 2
    e_pert = torch.cat([positive, own, other])
    y_pert = torch.tensor([0, 1, 1])
    owner = torch.tensor([0, 0, 5])
    with_own = float(angular_triplet(anchor, positive, e_pert, torch.tensor([0]), y_pert, 0.05))
    without = float(angular_triplet(anchor, positive, e_pert, torch.tensor([0]), y_pert, 0.05, owner))
    # float32: value ~ 1.05 (ulp 1.2e-7); 1 - cos of a near-parallel pair carries <= ~3u abs: <= 5e-7 < 1.05e-6
    assert with_own == pytest.approx(0.05 + 1 - float(1 - F.cosine_similarity(anchor, own)), rel=1e-6)
    assert without == pytest.approx(0.0)  # relu(0.05 + 1 - 2): the other example is the negative


def _objective(**params):
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(12)
    full = {"steps": 2, "ce_weight": 0.0, "inv_fraction": 1.0, **params}
    objs = ObjectiveSet(model, [(1.0, OBJECTIVES.get("ot_metric")(full, THREAT))], x[:1])
    return objs, objs.context(x, y, THREAT)


def test_invariance_examples_have_their_own_radius():
    objs, ctx = _objective(inv_eps=0.35)
    inv = objs.weighted[0][1].invariance_examples(ctx)
    dev = (inv.x - ctx.x).abs().flatten(1).amax(1)[inv.valid]
    assert float(dev.max()) <= 0.35 + 1e-6  # projected in float32: one rounding of x + delta
    assert float(dev.max()) > THREAT.eps  # beyond the sensitivity eps: room to change the class
    objs.close()


@pytest.mark.parametrize("choice", ["new", "source"])
def test_the_invariance_label_is_the_stated_choice(choice):
    objs, ctx = _objective(inv_label=choice)
    obj = objs.weighted[0][1]
    inv = obj.invariance_examples(ctx)
    _, y_pert, owner = obj.perturbed(ctx)
    n = ctx.x.shape[0]
    expected = inv.label[inv.valid] if choice == "new" else ctx.y[owner[n:]]
    assert torch.equal(y_pert[n:], expected)
    assert bool((inv.label[inv.valid] != ctx.y[: len(inv.valid)][inv.valid]).all())  # t is another class
    assert torch.equal(owner[:n], torch.arange(n))
    objs.close()


@pytest.mark.parametrize("marginals", ["per_class", "unbalanced"])
def test_the_ot_term_alone_trains_the_embedding(marginals):
    objs, ctx = _objective(marginals=marginals, triplet_weight=0.0, norm_reg=0.0)  # ce_weight 0 too
    loss = objs.weighted[0][1].loss(ctx)
    assert float(loss.detach()) > 0  # nothing but the OT term is left in it
    loss.backward()
    grads = [p.grad for p in ctx.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    objs.close()


def _prepare(names_params, model, x, y):
    weighted = [(1.0, OBJECTIVES.get(n)(p, THREAT)) for n, p in names_params]
    objs = ObjectiveSet(model, weighted, x[:1])
    return objs, objs.context(x, y, THREAT)


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


def test_ot_metric_inv_fraction_builds_invariance_examples_for_a_subset():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, ctx = _prepare([("ot_metric", {"steps": 1, "inv_fraction": 0.25})], model, x, y)
    inv = objs.weighted[0][1].invariance_examples(ctx)
    assert inv.x.shape[0] == 4 and bool((inv.label != y[:4])[inv.valid].all())
    assert torch.isfinite(objs.weighted[0][1].loss(ctx))
    objs.close()
