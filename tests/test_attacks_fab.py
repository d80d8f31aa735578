"""harden.attacks.fab: FAB-T, the targeted minimal-norm attack (its exact projection, strength, targets, early
stop, cost per step, target screening, progress).

The strength checks run on TinyCNN trained on synthetic data and on scikit-learn's digits (359 test
images); the cross-checks against torchattacks (exact one-sided McNemar tests) are marked slow. The cost and
screening checks use a linear model, whose decision boundaries FAB's linearisation gives exactly.
"""

import copy

import numpy as np
import pytest
import torch
from helpers_attacks import acc, assert_not_weaker, check_box_edge, check_inside_ball_and_box, check_same_seed
from torch import nn

import harden
from harden.attacks.base import ATTACKS, lp_norm
from harden.attacks.fab import FABParams, FABTargeted, project_hyperplane_box, rank_targets
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
        "screen_steps": None,
        "full_targets": 1,
    }


@pytest.mark.parametrize(
    "params",
    [
        {"steps": 0},
        {"eta": 0.5},
        {"screen_steps": 0},
        {"screen_steps": 2.5},
        {"full_targets": 0},
        {"full_targets": None},
    ],
)
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
@pytest.mark.parametrize("screen", [None, 4], ids=["reference", "screened"])
def test_same_result_under_the_same_seed(threat, screen, synthetic_cnn):
    check_same_seed(lambda t, **kw: make(t, screen_steps=screen, n_target_classes=2, **kw), threat, *synthetic_cnn)


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
        def _run(self, model, x0, y, target, random_start, steps):
            calls.append((target.clone(), random_start))
            return super()._run(model, x0, y, target, random_start, steps)

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


class LinearSpy(nn.Module):
    """A linear classifier on 8x8 images (weights x10, seeded) that counts its forward rows: with an input gradient
    (a step's gradient evaluation) and without (a candidate's test, the clean forward and the final check)."""

    def __init__(self, num_classes):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.fc = nn.Linear(64, num_classes)
        with torch.no_grad():
            self.fc.weight.mul_(10.0)
        self.grad_rows = self.test_rows = self.test_calls = 0

    def forward(self, x):
        if x.requires_grad:
            self.grad_rows += x.shape[0]
        else:
            self.test_rows += x.shape[0]
            self.test_calls += 1
        return self.fc(x.flatten(1))


def linear_case(num_classes, n=16):
    """The spy, inputs inside [0.4, 0.6] (the box binds no step below 0.4) labelled by the model, and the exact
    float64 distances ``dist[i, c]`` (l2, linf) from ``x[i]`` to the boundary between ``y[i]`` and class ``c``."""
    model = LinearSpy(num_classes)
    x = 0.4 + 0.2 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model.fc(x.flatten(1)).argmax(1)
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    gap = (x.flatten(1).double() @ w.T + b).gather(1, y[:, None]) - (x.flatten(1).double() @ w.T + b)
    dw = w[y][:, None, :] - w[None, :, :]  # (n, classes, 64)
    dist = {"l2": gap / dw.norm(dim=2), "linf": gap / dw.abs().sum(dim=2)}
    model.grad_rows = model.test_rows = model.test_calls = 0
    return model, x, y, dist


class Runs(FABTargeted):
    """FAB-T that records each run: target, random start, steps, rows, gradient rows spent, found norms, lin."""

    def __init__(self, *args):
        super().__init__(*args)
        self.runs = []

    def _run(self, model, x0, y, target, random_start, steps):
        before = model.grad_rows
        best, found, lin = super()._run(model, x0, y, target, random_start, steps)
        self.runs.append((target.clone(), random_start, steps, x0.shape[0], model.grad_rows - before, found, lin))
        return best, found, lin


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_each_step_costs_one_gradient_evaluation_and_one_forward(norm):
    """Reference FAB-T on examples no run breaks (eps 1e-5, boundaries >= 1e-4 away): every step evaluates one
    gradient per row and tests its candidate with one forward; besides, one clean forward and one final check."""
    model, x, y, dist = linear_case(num_classes=3)
    others = dist[norm].masked_fill(nn.functional.one_hot(y, 3).bool(), float("inf"))
    assert float(others.min()) > 1e-4  # no adversarial point of norm <= eps exists
    attack = FABTargeted(ThreatModel(norm=norm, eps=1e-5), {"steps": 5, "n_target_classes": 2, "restarts": 2})
    attack(model, x, y)
    assert torch.isinf(attack.last_norms).all()
    steps = 5 * 2 * 2  # steps x targets x restarts, each on all 16 rows
    assert model.grad_rows == 16 * steps
    assert model.test_calls == 1 + steps + 1 and model.test_rows == 16 * (1 + steps + 1)


def test_screening_runs_the_full_steps_only_on_the_ranked_targets():
    """Screening on 4 targets (2 steps each), then 2 full targets x 2 restarts x 6 steps: 32 gradient rows per
    example instead of the reference's 48, and the full runs go to the targets the screen ranked best.

    The model is linear and no step meets the box, so FAB moves along the straight line from ``x0`` to the
    target's boundary: the screen's first candidate lies at 1.05 times the distance ``D_t``, the second (the
    first's backward step at 0.9, then the bias a = 0.055 / 1.055) at the same multiple of ``D_t`` for every
    target, both adversarial. So the screen ranks the targets by ``D_t``, and its last ``||delta_0||`` is ``D_t``.
    """
    model, x, y, dist = linear_case(num_classes=5)
    dist = dist["l2"]
    attack = Runs(
        ThreatModel(norm="l2", eps=1e-5),
        {"steps": 6, "n_target_classes": 4, "screen_steps": 2, "full_targets": 2, "restarts": 2},
    )
    with torch.no_grad():
        targets = model.fc(x.flatten(1)).argsort(1, descending=True)[:, 1:]
    exact = dist.gather(1, targets)  # D_t, every other class is a target
    w = model.fc.weight.detach().double()
    dw = w[y][:, None] - w[targets]  # the boundaries' normals
    # nothing breaks; no step meets the box: a pixel moves <= 1.05 D_t |dw_i| / ||dw|| < 0.4 from x in [0.4, 0.6]
    assert float(exact.min()) > 1e-4 and (1.05 * exact * dw.abs().amax(dim=2) / dw.norm(dim=2)).max() < 0.4
    attack(model, x, y)
    assert torch.isinf(attack.last_norms).all()
    runs = attack.runs
    assert [(r[1], r[2], r[3], r[4]) for r in runs] == [(False, 2, 16, 32)] * 4 + [
        (False, 6, 16, 96),
        (True, 6, 16, 96),
    ] * 2
    assert model.grad_rows == 16 * (4 * 2 + 2 * 2 * 6)
    for k in range(4):
        assert torch.equal(runs[k][0], targets[:, k])
    found = torch.stack([r[5] for r in runs[:4]], dim=1).double()
    lin = torch.stack([r[6] for r in runs[:4]], dim=1).double()
    # float32 error of a distance: the logits, <w, x> (|w_i| <= 2 * 10 / 8, |x_i| <= 1: <= 160 over 64 terms) and
    # the projection's sums each round <= 64 u relative to 160; over ||w||_2 >= the smallest class-pair gap
    tol = 4 * 64 * 2**-24 * 160 / float(dw.norm(dim=2).min())
    assert (lin - exact).abs().max() <= tol
    assert torch.isfinite(found).all() and (found >= exact - tol).all() and (found <= 1.05 * exact + tol).all()
    chosen = targets.gather(1, rank_targets(found, lin)[:, :2])
    for j in range(2):
        assert torch.equal(runs[4 + 2 * j][0], chosen[:, j]) and torch.equal(runs[5 + 2 * j][0], chosen[:, j])
    # the same targets as the exact distances pick (found = the same multiple of D_t for every target, each within
    # tol), wherever the 2nd and 3rd nearest boundaries differ by more than 2 tol
    near, order = exact.sort(dim=1)
    clear = near[:, 2] - near[:, 1] > 2 * tol
    assert int(clear.sum()) >= 12
    assert torch.equal(chosen.sort(1).values[clear], targets.gather(1, order[:, :2]).sort(1).values[clear])


def test_rank_targets_puts_found_points_first_then_linearised_distances():
    inf = float("inf")
    found = torch.tensor([[inf, 0.4, inf, 0.2], [inf, inf, inf, inf], [0.3, 0.3, inf, 0.1]])
    lin = torch.tensor([[0.01, 0.5, 0.02, 0.9], [0.3, 0.1, 0.1, 0.2], [0.0, 0.0, 0.0, 0.0]])
    assert rank_targets(found, lin).tolist() == [[3, 1, 0, 2], [1, 2, 3, 0], [3, 0, 1, 2]]


@pytest.mark.parametrize("screen", [20, 25])
def test_screen_steps_at_least_steps_is_the_reference(screen, synthetic_cnn):
    model, x, y = synthetic_cnn
    out = []
    for params in ({}, {"screen_steps": screen, "full_targets": 2}):
        attack = make(L2, restarts=2, **params)
        torch.manual_seed(5)
        out.append((attack(model, x, y), attack.last_norms))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_progress_ticks_at_every_run_and_end_at_one():
    """On examples no run breaks, the ticks are the fractions of the steps done (exact binary fractions)."""
    model, x, y, _ = linear_case(num_classes=5)
    cases = [
        ({"steps": 6, "n_target_classes": 2, "restarts": 2}, [0.25, 0.5, 0.75, 1.0, 1.0]),
        (
            {"steps": 6, "n_target_classes": 4, "screen_steps": 2, "full_targets": 2, "restarts": 2},
            [k / 32 for k in (2, 4, 6, 8, 14, 20, 26, 32, 32)],
        ),
    ]
    for params, expected in cases:
        attack = FABTargeted(ThreatModel(norm="l2", eps=1e-5), params)
        ticks: list[float] = []
        attack.on_progress = ticks.append
        attack(model, x, y)
        assert ticks == expected


def test_progress_ends_at_one_when_everything_breaks_early(synthetic_cnn):
    model, x, y = synthetic_cnn
    attack = FABTargeted(ThreatModel(norm="linf", eps=0.5), {"steps": 10, "screen_steps": 3})
    ticks: list[float] = []
    attack.on_progress = ticks.append
    attack(model, x, y)
    assert torch.isfinite(attack.last_norms).all()
    assert ticks == sorted(ticks) and ticks[-1] == 1.0 and all(0 < t <= 1 for t in ticks)


TA_THREATS = pytest.mark.parametrize(
    ("threat", "ta_norm"),
    [(ThreatModel(norm="linf", eps=0.1), "Linf"), (ThreatModel(norm="l2", eps=0.5), "L2")],
    ids=["linf", "l2"],
)


def torchattacks_fab(model, threat, ta_norm, steps, x, y):
    torchattacks = pytest.importorskip("torchattacks")
    ta = torchattacks.FAB(
        model, norm=ta_norm, eps=threat.eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10
    )
    adv = ta(x, y)
    model.zero_grad(set_to_none=True)  # torchattacks leaves gradients on the shared fixture
    return adv


@pytest.mark.slow
@TA_THREATS
def test_fab_at_least_as_strong_as_torchattacks(threat, ta_norm, digits_cnn):
    """The reference (100 steps, 9 targets) vs torchattacks' FAB with the same settings."""
    model, x, y = digits_cnn
    theirs = torchattacks_fab(model, threat, ta_norm, 100, x, y)
    torch.manual_seed(0)
    ours = FABTargeted(threat, {"steps": 100})(model, x, y)
    assert acc(model, ours, y) < acc(model, x, y)
    assert_not_weaker(model, ours, theirs, y)


@pytest.mark.slow
@TA_THREATS
def test_screened_fab_not_weaker_than_torchattacks_default(threat, ta_norm, digits_cnn):
    """Screened FAB-T (10-step screen, one 100-step full target) vs torchattacks' AutoAttack FAB-T (10 steps)."""
    model, x, y = digits_cnn
    theirs = torchattacks_fab(model, threat, ta_norm, 10, x, y)
    torch.manual_seed(0)
    ours = FABTargeted(threat, {"steps": 100, "screen_steps": 10, "full_targets": 1})(model, x, y)
    assert acc(model, ours, y) < acc(model, x, y)
    assert_not_weaker(model, ours, theirs, y)
