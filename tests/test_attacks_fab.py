"""harden.attacks.fab: FAB-T, the targeted minimal-norm attack (its exact projection, strength, targets, early stop).

The strength checks run on TinyCNN trained on synthetic data and on scikit-learn's digits (359 test
images); the cross-checks against torchattacks are marked slow.
"""

import copy

import numpy as np
import pytest
import torch
from helpers_attacks import acc, check_box_edge, check_inside_ball_and_box, check_same_seed

import harden
from harden.attacks.base import ATTACKS, lp_norm
from harden.attacks.fab import FABParams, FABTargeted, project_hyperplane_box
from harden.policy import ThreatModel

LINF, L2 = ThreatModel(norm="linf", eps=0.1), ThreatModel(norm="l2", eps=0.5)

THREATS = pytest.mark.parametrize("threat", [LINF, L2], ids=["linf", "l2"])


def make(threat, **params):
    return FABTargeted(threat, {"steps": 20, **params})


def test_registered_as_a_white_box_attack_with_the_reference_defaults():
    assert ATTACKS.get("fab_t") is FABTargeted
    assert FABTargeted.white_box is True and FABTargeted.bounded
    assert FABParams().model_dump() == {
        "n_target_classes": 9,
        "steps": 100,
        "restarts": 1,
        "alpha_max": 0.1,
        "eta": 1.05,
        "beta": 0.9,
        "early_stop": True,
    }


@pytest.mark.parametrize("params", [{"steps": 0}, {"eta": 0.5}])
def test_bad_params_raise(params):
    with pytest.raises(harden.PolicyError):
        ATTACKS.get("fab_t")(LINF, params)


@THREATS
@pytest.mark.parametrize("data", ["synthetic_cnn", "digits_cnn"])
def test_inside_ball_and_box(threat, data, request):
    check_inside_ball_and_box(make, threat, *request.getfixturevalue(data))


def test_inputs_on_the_box_edge(synthetic_cnn):
    check_box_edge(make, synthetic_cnn[0], (LINF, L2))


@THREATS
def test_same_result_under_the_same_seed(threat, synthetic_cnn):
    check_same_seed(make, threat, *synthetic_cnn)


def test_projection_is_the_exact_box_constrained_minimum():
    from scipy.optimize import linprog, minimize

    gen = torch.Generator().manual_seed(0)
    n, d = 40, 12
    t = torch.rand(n, d, generator=gen, dtype=torch.float64)
    t[:, :2] = torch.randint(0, 2, (n, 2), generator=gen).double()  # some pixels on the box edge
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w[:, 3] = 0.0
    b = (w * t).sum(1) + torch.randn(n, generator=gen, dtype=torch.float64)
    for norm in ("linf", "l2"):
        delta = project_hyperplane_box(t.float(), w.float(), b.float(), norm).double().numpy()
        checked = 0
        for i in range(n):
            ti, wi, r = t[i].numpy(), w[i].numpy(), float(b[i] - w[i] @ t[i])
            lo, hi = -ti, 1 - ti
            reach = np.where(wi > 0, wi * hi, wi * lo).sum(), np.where(wi > 0, wi * lo, wi * hi).sum()
            if not reach[1] <= r <= reach[0]:
                continue  # the hyperplane misses the box
            checked += 1
            # float32 inputs, r and cumsums of <= d = 12 terms: about 2d + 6 roundings, each of a term
            # <= sum|w| (|t| + |delta| + cap) <= 3 sum|w|, plus |b|; 30u per term covers them
            assert abs(wi @ delta[i] - r) <= 30 * 2**-24 * (3 * np.abs(wi).sum() + abs(float(b[i])))
            assert (ti + delta[i] >= -1e-6).all() and (ti + delta[i] <= 1 + 1e-6).all()
            if norm == "linf":
                lp = linprog(
                    np.r_[np.zeros(d), 1.0],
                    A_ub=np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]]),
                    b_ub=np.zeros(2 * d),
                    A_eq=np.r_[wi, 0.0][None],
                    b_eq=[r],
                    bounds=[*zip(lo, hi, strict=True), (0, None)],
                )
                best, ours = lp.fun, np.abs(delta[i]).max()
            else:
                qp = minimize(
                    lambda z: z @ z,
                    np.zeros(d),
                    jac=lambda z: 2 * z,
                    method="SLSQP",
                    constraints=[{"type": "eq", "fun": lambda z, wi=wi, r=r: wi @ z - r}],
                    bounds=list(zip(lo, hi, strict=True)),
                    options={"ftol": 1e-14, "maxiter": 500},
                )
                best, ours = np.sqrt(qp.fun), np.linalg.norm(delta[i])
            # ours: float32, d = 12, ~d*u = 7e-7 relative; SLSQP at ftol 1e-14 on |z|^2 (1e-7 on the
            # norm) and HiGHS at feasibility 1e-7: the bounds leave more than 100x room
            assert ours == pytest.approx(best, rel=1e-4, abs=1e-5)
        assert checked > n // 2


@THREATS
def test_fab_breaks_an_undefended_model_at_a_large_eps(threat, digits_cnn):
    model, x, y = digits_cnn
    x, y = x[:100], y[:100]
    big = ThreatModel(norm=threat.norm, eps=threat.eps * 3)
    attack = FABTargeted(big, {"steps": 30})
    adv = attack(model, x, y)
    assert acc(model, adv, y) < 0.1 < acc(model, x, y) - 0.5
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    found = torch.isfinite(attack.last_norms)
    # a reported success is a real adversarial example in the ball: FAB re-checks its result with a
    # forward of these 100 returned rows (the same computation as here), so the match is exact
    assert torch.equal(found, broken)
    assert float(attack.last_norms[found].max()) <= big.eps
    assert torch.equal(adv[~found], x[~found])  # the others come back unchanged


def test_fab_targets_at_most_the_other_classes(synthetic_cnn):
    """With 3 classes FAB-T has 2 targets, whatever n_target_classes says."""
    model, x, y = synthetic_cnn
    calls = []

    class Count(FABTargeted):
        def _run(self, model, x0, y, target, random_start):
            calls.append((target.clone(), random_start))
            return super()._run(model, x0, y, target, random_start)

    Count(ThreatModel(norm="linf", eps=0.02), {"steps": 5, "restarts": 2})(model, x, y)
    assert [r for _, r in calls] == [False, True, False, True][: len(calls)] and len(calls) <= 4
    with torch.no_grad():
        ranked = model(x).argsort(1, descending=True)
    assert set(calls[0][0].tolist()) <= set(ranked[:, 1].tolist())


def test_fab_early_stop_keeps_robust_accuracy(digits_cnn):
    """Early stopping only shrinks the batch; in exact arithmetic the rows still running follow the
    same trajectories, so the same examples are broken. In float32 the changing batch shapes move
    logits by ~1e-7 relative, enough to flip a decision at the boundary or at eps; in float64 the
    moves are ~d * 2^-53 ~ 1e-14 relative, so the attacks run in float64 (through ``perturb``, as
    ``__call__`` takes float32 pixels only)."""
    model, x, y = digits_cnn
    m64 = copy.deepcopy(model).double().eval()
    x, y = x[:80].double(), y[:80]
    threat = ThreatModel(norm="l2", eps=0.6)
    early = FABTargeted(threat, {"steps": 20})
    full = FABTargeted(threat, {"steps": 20, "early_stop": False})
    a, b = early.perturb(m64, x, y), full.perturb(m64, x, y)
    assert a.dtype == b.dtype == torch.float64
    found = torch.isfinite(full.last_norms)
    assert torch.equal(torch.isfinite(early.last_norms), found) and 0 < int(found.sum()) < 80
    assert acc(m64, a, y) == acc(m64, b, y)
    # without early stopping the returned examples are the smallest found, so never larger (float64
    # norms of 64 terms: relative error <= 64 * 2^-53 ~ 7e-15, far below 1e-12)
    assert (lp_norm(b - x, "l2")[found] <= lp_norm(a - x, "l2")[found] + 1e-12).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("threat", "ta_norm"),
    [(ThreatModel(norm="linf", eps=0.1), "Linf"), (ThreatModel(norm="l2", eps=0.5), "L2")],
    ids=["linf", "l2"],
)
def test_fab_at_least_as_strong_as_torchattacks(threat, ta_norm, digits_cnn):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits_cnn
    torch.manual_seed(0)
    ours = acc(model, FABTargeted(threat, {"steps": 100})(model, x, y), y)
    ta = torchattacks.FAB(
        model, norm=ta_norm, eps=threat.eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10
    )
    theirs = acc(model, ta(x, y), y)
    model.zero_grad(set_to_none=True)  # torchattacks leaves gradients on the shared fixture
    assert ours < acc(model, x, y)
    assert ours <= theirs + 0.01
