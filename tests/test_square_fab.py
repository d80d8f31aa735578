"""Square (score-based black-box) and FAB-T (targeted minimal-norm) attacks.

Both modules are imported explicitly (they register themselves); the cross-checks against
torchattacks run on a small CNN trained on scikit-learn's digits (359 test images).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import harden
from harden.attacks.base import ATTACKS, lp_norm, save_modes
from harden.attacks.fab import FABParams, FABTargeted, project_hyperplane_box
from harden.attacks.square import Square, margin, p_schedule
from harden.data import load_data
from harden.policy import DataSpec, ThreatModel
from harden.testing import TinyCNN, synthetic_tensors

LINF, L2 = ThreatModel(norm="linf", eps=0.1), ThreatModel(norm="l2", eps=0.5)
THREATS = pytest.mark.parametrize("threat", [LINF, L2], ids=["linf", "l2"])
#: cheap settings for the contract checks
CHEAP = {"square": {"n_queries": 200}, "fab_t": {"steps": 20}}
ATTACK_NAMES = pytest.mark.parametrize("name", ["square", "fab_t"])


def make(name, threat, **params):
    return ATTACKS.get(name)(threat, {**CHEAP[name], **params})


@torch.no_grad()
def acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def fit(model, x, y, epochs, lr, batch=64, seed=0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and immune to a busy machine
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(len(x))
                for i in range(0, len(x), batch):
                    idx = perm[i : i + batch]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def synthetic():
    """TinyCNN trained a few seeded steps on the 3-class synthetic data, and held-out data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=3)
    x, y = synthetic_tensors(384, seed=1)
    fit(model, x, y, epochs=2, lr=0.01)
    xt, yt = synthetic_tensors(96, seed=2)
    return model, xt, yt


@pytest.fixture(scope="module")
def digits():
    """A 10-class small CNN trained quickly on sklearn digits, and the 359 test images."""
    bundle = load_data(DataSpec(name="digits"))
    xtr, ytr = next(iter(DataLoader(bundle.train, batch_size=len(bundle.train))))
    xte, yte = next(iter(DataLoader(bundle.test, batch_size=len(bundle.test))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=10, in_chans=1, width=16)
    fit(model, xtr, ytr, epochs=6, lr=0.01)
    return model, xte, yte


def test_models_are_accurate(synthetic, digits):
    assert acc(*synthetic) >= 0.9
    assert acc(*digits) >= 0.9


# --------------------------------------------------------------------------- the contract


def test_registered_with_their_kind():
    assert ATTACKS.get("square") is Square and ATTACKS.get("fab_t") is FABTargeted
    assert Square.white_box is False and Square.bounded
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
    assert Square(LINF).params.model_dump() == {"n_queries": 5000, "p_init": 0.8, "restarts": 1}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("square", {"n_queries": 0}),
        ("square", {"p_init": 1.5}),
        ("fab_t", {"steps": 0}),
        ("fab_t", {"eta": 0.5}),
        ("square", {"steps": 3}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(harden.PolicyError):
        ATTACKS.get(name)(LINF, params)


@ATTACK_NAMES
@THREATS
@pytest.mark.parametrize("data", ["synthetic", "digits"])
def test_inside_ball_and_box(name, threat, data, request):
    model, x, y = request.getfixturevalue(data)
    x, y = x[:48], y[:48]
    x0 = x.clone()
    model.train()
    model.features[1].eval()
    modes = save_modes(model)
    big = ThreatModel(norm=threat.norm, eps=threat.eps * 3)  # large enough to move most examples
    adv = make(name, big)(model, x, y)
    assert save_modes(model) == modes
    model.eval()
    assert torch.equal(x, x0)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(lp_norm(adv - x, threat.norm).max()) <= big.eps * (1 + 1e-5) + 1e-6
    assert not torch.equal(adv, x)
    assert all(p.grad is None for p in model.parameters())


@ATTACK_NAMES
def test_inputs_on_the_box_edge(name, synthetic):
    model = synthetic[0]
    x = torch.zeros(4, 1, 8, 8)
    x[2:] = 1.0
    for threat in (LINF, L2):
        adv = make(name, threat)(model, x, torch.tensor([0, 1, 2, 0]))
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float(lp_norm(adv - x, threat.norm).max()) <= threat.eps * (1 + 1e-5) + 1e-6


@ATTACK_NAMES
@THREATS
def test_same_result_under_the_same_seed(name, threat, synthetic):
    model, x, y = synthetic
    attack = make(name, threat, restarts=2)
    torch.manual_seed(3)
    a = attack(model, x, y)
    torch.manual_seed(3)
    b = attack(model, x, y)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- Square


class NoGradSpy(nn.Module):
    """Records, per forward call, whether autograd was on and how many rows were queried."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad_enabled = []
        self.rows = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled() or x.requires_grad)
        self.rows.append(x.shape[0])
        return self.net(x)


def test_square_schedule_and_margin():
    assert [p_schedule(i, 10_000, 0.8) for i in (0, 10, 11, 50, 51, 8000, 8001)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.8 / 256,
        0.8 / 512,
    ]
    assert p_schedule(500, 5000, 0.8) == p_schedule(1000, 10_000, 0.8)  # rescaled to the budget
    assert margin(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([1])).item() == 1.0


@THREATS
def test_square_uses_no_gradients_and_counts_its_queries(threat, synthetic):
    net, x, y = synthetic
    spy = NoGradSpy(net)
    attack = Square(threat, {"n_queries": 150})
    adv = attack(spy, x, y)
    assert spy.grad_enabled and not any(spy.grad_enabled)
    counts = attack.last_query_counts
    assert counts.shape == (x.shape[0],) and int(counts.max()) <= 150
    assert attack.last_queries == pytest.approx(counts.float().mean().item())
    # every row the model saw is accounted for: one clean pass plus the counted queries
    assert sum(spy.rows) == x.shape[0] + int(counts.sum())
    with torch.no_grad():
        clean_wrong = net(x).argmax(1) != y
        fooled = (net(adv).argmax(1) != y) & ~clean_wrong
    assert (counts[clean_wrong] == 0).all()  # never queried
    assert (counts[fooled] < 150).float().mean() > 0.8  # stopped once fooled (possibly by the last query)
    assert (counts[~fooled & ~clean_wrong] == 150).all()  # the others used the whole budget


@pytest.mark.parametrize(("norm", "eps_synthetic", "eps_digits"), [("linf", 0.1, 0.1), ("l2", 1.0, 0.5)])
def test_square_lowers_accuracy(norm, eps_synthetic, eps_digits, synthetic, digits):
    for (model, x, y), eps in ((synthetic, eps_synthetic), (digits, eps_digits)):
        torch.manual_seed(0)
        adv = Square(ThreatModel(norm=norm, eps=eps), {"n_queries": 300})(model, x[:150], y[:150])
        assert acc(model, adv, y[:150]) < acc(model, x[:150], y[:150]) - 0.1


def test_square_restarts_only_attack_the_rest(synthetic):
    net, x, y = synthetic
    spy = NoGradSpy(net)
    attack = Square(LINF, {"n_queries": 40, "restarts": 3})
    attack(spy, x, y)
    assert int(attack.last_query_counts.max()) <= 3 * 40
    assert sum(spy.rows) == x.shape[0] + int(attack.last_query_counts.sum())


# --------------------------------------------------------------------------- FAB-T


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
            assert abs(wi @ delta[i] - r) < 1e-4
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
            assert ours == pytest.approx(best, rel=1e-4, abs=1e-5)
        assert checked > n // 2


@THREATS
def test_fab_breaks_an_undefended_model_at_a_large_eps(threat, digits):
    model, x, y = digits
    x, y = x[:100], y[:100]
    big = ThreatModel(norm=threat.norm, eps=threat.eps * 3)
    attack = FABTargeted(big, {"steps": 30})
    adv = attack(model, x, y)
    assert acc(model, adv, y) < 0.1 < acc(model, x, y) - 0.5
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    found = torch.isfinite(attack.last_norms)
    assert torch.equal(found, broken)  # a reported success is a real adversarial example in the ball
    assert float(attack.last_norms[found].max()) <= big.eps
    assert torch.equal(adv[~found], x[~found])  # the others come back unchanged


def test_fab_targets_at_most_the_other_classes(synthetic):
    """With 3 classes FAB-T has 2 targets, whatever n_target_classes says."""
    model, x, y = synthetic
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


def test_fab_early_stop_keeps_robust_accuracy(digits):
    model, x, y = digits
    x, y = x[:80], y[:80]
    threat = ThreatModel(norm="l2", eps=0.6)
    a = FABTargeted(threat, {"steps": 20})(model, x, y)
    full = FABTargeted(threat, {"steps": 20, "early_stop": False})
    b = full(model, x, y)
    assert acc(model, a, y) == acc(model, b, y)
    # without early stopping the returned examples are the smallest found, so never larger
    found = torch.isfinite(full.last_norms)
    assert (lp_norm(b - x, "l2")[found] <= lp_norm(a - x, "l2")[found] + 1e-5).all()


# --------------------------------------------------------------------------- torchattacks


@pytest.mark.slow
@pytest.mark.parametrize(
    ("threat", "ta_norm"),
    [(ThreatModel(norm="linf", eps=0.1), "Linf"), (ThreatModel(norm="l2", eps=0.5), "L2")],
    ids=["linf", "l2"],
)
def test_square_at_least_as_strong_as_torchattacks(threat, ta_norm, digits):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits  # 359 images
    torch.manual_seed(0)
    ours = acc(model, Square(threat, {"n_queries": 1000})(model, x, y), y)
    theirs = acc(model, torchattacks.Square(model, norm=ta_norm, eps=threat.eps, n_queries=1000, seed=0)(x, y), y)
    assert ours < acc(model, x, y)
    assert ours <= theirs + 0.01


@pytest.mark.slow
@pytest.mark.parametrize(
    ("threat", "ta_norm"),
    [(ThreatModel(norm="linf", eps=0.1), "Linf"), (ThreatModel(norm="l2", eps=0.5), "L2")],
    ids=["linf", "l2"],
)
def test_fab_at_least_as_strong_as_torchattacks(threat, ta_norm, digits):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    torch.manual_seed(0)
    ours = acc(model, FABTargeted(threat, {"steps": 100})(model, x, y), y)
    ta = torchattacks.FAB(
        model, norm=ta_norm, eps=threat.eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10
    )
    theirs = acc(model, ta(x, y), y)
    assert ours < acc(model, x, y)
    assert ours <= theirs + 0.01
