"""harden.objectives.mi: the MI objective's loss against a hand-written reference, its two stages
(estimator warm-up on the frozen model, then frozen or alternating estimators), and its state."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_mi import dv_reference

import harden
from harden.objectives import OBJECTIVES, BatchContext, ObjectiveSet, pgd_view
from harden.objectives.mi import MI, selection
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy
from harden.train import fit

THREAT = ThreatModel(eps=0.1)


def _prepare(params, model, x, y):
    objs = ObjectiveSet(model, [(1.0, OBJECTIVES.get("mi")(params, THREAT))], x[:1])
    return objs, objs.context(x, y, THREAT)


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_model_loss_is_the_papers_formula_on_a_fixed_batch(trained):
    """CE(f(x~)) + alpha [Lcos_n + Lcos_a + lam mean_sel(I_a - I_n)], vectors over sel (float64)."""
    torch.manual_seed(0)
    model = copy.deepcopy(trained).eval()  # eval: the reference's forwards see the same BatchNorm
    x, y = synthetic_tensors(24, seed=2)
    params = {"steps": 3, "alpha": 5.0, "lam": 0.1, "ce_weight": 1.0, "dim": 8}
    objs, ctx32 = _prepare(params, model, x, y)
    x_adv = ctx32.view(pgd_view(3)).double()  # attacks run in float32; the rest in float64 below
    model.double()
    obj = objs.weighted[0][1]
    obj.natural.double()
    obj.adversarial.double()
    x = x.double()
    ctx = objs.context(x, y, THREAT)
    ctx._views[pgd_view(3)] = x_adv
    got = obj.loss(ctx)

    with torch.no_grad():
        ln, la = model(x), model(x_adv)
        sel = [i for i in range(24) if ln[i].argmax() == y[i] and la[i].argmax() != y[i]]
        assert len(sel) >= 3, len(sel)  # the batch exercises the terms
        n_nat, n_adv = dv_reference(obj.natural, x, ln), dv_reference(obj.natural, x, la)
        a_adv, a_nat = dv_reference(obj.adversarial, x_adv - x, la), dv_reference(obj.adversarial, x_adv - x, ln)
        lcos_n = abs(1 - _cos(n_nat[sel], n_adv[sel]))
        lcos_a = abs(1 - _cos(a_adv[sel], a_nat[sel]))
        lam_term = float((a_adv[sel] - n_adv[sel]).mean())
        expected = float(F.cross_entropy(la, y)) + 5.0 * (lcos_n + lcos_a + 0.1 * lam_term)
    # float64 throughout; only summation orders differ
    assert float(got.detach()) == pytest.approx(expected, rel=1e-9)


def test_selection_uses_the_argmax_of_the_logits_per_example():
    ln = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    la = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    right, fooled = selection(ln, la, torch.tensor([0, 0, 0]))
    assert right.tolist() == [True, True, False] and fooled.tolist() == [True, False, True]


def test_selection_counts_non_finite_logits_as_wrong_and_as_fooled():
    nan, inf = float("nan"), float("inf")
    ln = torch.tensor([[nan, 0.0], [3.0, 0.0], [inf, 0.0], [3.0, 0.0]])
    la = torch.tensor([[3.0, 0.0], [nan, nan], [0.0, 1.0], [3.0, -inf]])
    right, fooled = selection(ln, la, torch.tensor([0, 0, 0, 0]))  # argmax of each NaN or inf row: 0, the label
    assert right.tolist() == [False, True, False, True] and fooled.tolist() == [False, True, True, True]


def test_the_model_loss_never_trains_the_estimators():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, ctx = _prepare({"steps": 2}, model, x, y)
    obj = objs.weighted[0][1]
    obj.loss(ctx).backward()
    assert all(p.grad is None for p in [*obj.natural.parameters(), *obj.adversarial.parameters()])
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("estimators", "changes"), [("frozen", False), ("alternating", True)])
def test_after_step_trains_the_estimators_only_when_alternating(estimators, changes):
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, ctx = _prepare({"steps": 2, "estimators": estimators}, model, x, y)
    obj = objs.weighted[0][1]
    before = copy.deepcopy(obj.natural.state_dict())
    objs.loss(ctx)[0].backward()
    objs.after_step(ctx)
    after = obj.natural.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before) == changes


def test_warm_up_runs_once_right_before_start_epoch_on_the_frozen_model():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(32)
    objs, _ = _prepare({"steps": 2, "start_epoch": 1, "warmup_epochs": 2}, model, x, y)
    obj = objs.weighted[0][1]
    passes = []

    def batches():
        passes.append(1)
        return [(x[:16], y[:16]), (x[16:], y[16:])]

    model_before = copy.deepcopy(model.state_dict())
    est_before = copy.deepcopy(obj.natural.state_dict())
    model.train()
    objs.begin_epoch(0, batches)
    assert passes == [] and not obj.active and not obj.warmed_up
    objs.begin_epoch(1, batches)
    assert passes == [1, 1] and obj.active and obj.warmed_up  # warmup_epochs passes
    assert model.training  # left as it was found
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model_before.items())  # frozen: not one change
    assert any(not torch.equal(v, obj.natural.state_dict()[k]) for k, v in est_before.items())
    objs.begin_epoch(2, batches)
    assert passes == [1, 1]  # once


def test_before_start_epoch_the_loss_is_the_ce_term_only():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, ctx = _prepare({"steps": 2, "start_epoch": 3}, model, x, y)
    loss = objs.weighted[0][1].loss(ctx)
    torch.testing.assert_close(loss, F.cross_entropy(ctx.logits(pgd_view(2)), y))


def test_frozen_estimators_need_a_warm_up():
    with pytest.raises(harden.PolicyError, match="warmup_epochs"):
        OBJECTIVES.get("mi")({"warmup_epochs": 0}, THREAT)
    assert OBJECTIVES.get("mi")({"warmup_epochs": 0, "estimators": "alternating"}, THREAT).params.warmup_epochs == 0


def test_mi_without_setup_raises_clearly():
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(4)
    obj = OBJECTIVES.get("mi")({"steps": 1}, THREAT)
    with pytest.raises(harden.HardenError, match="setup"):
        obj.loss(BatchContext(model, x, y, THREAT))


def test_mi_state_round_trips_and_refuses_foreign_state():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8)
    objs, _ = _prepare({"steps": 1}, model, x, y)
    objs.weighted[0][1].warmed_up = True
    state = objs.state_dict()
    objs2, _ = _prepare({"steps": 1}, model, x, y)
    objs2.load_state_dict(state)
    mi2: MI = objs2.weighted[0][1]
    a, b = objs.weighted[0][1].natural.state_dict(), mi2.natural.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and mi2.warmed_up
    with pytest.raises(harden.CheckpointError):
        objs2.load_state_dict({"0": {"natural": {}}})


@pytest.mark.slow
@pytest.mark.parametrize("start_epoch", [0, 1])
def test_fit_with_mi_resumes_exactly_with_its_estimators(tmp_path, start_epoch):
    mi = {"name": "mi", "params": {"steps": 1, "ce_weight": 0, "start_epoch": start_epoch}}
    objectives = [{"name": "pgd_at", "params": {"steps": 1}}, mi]
    train = {"epochs": 2, "probe_examples": 0, "schedule": "constant"}  # lr independent of the total
    straight = fit(None, tiny_policy(objectives=objectives, train=train), run_dir=tmp_path / "a", progress=False)
    first = tiny_policy(objectives=objectives, train={**train, "epochs": 1})
    fit(None, first, run_dir=tmp_path / "b", progress=False)
    resumed = fit(
        None, tiny_policy(objectives=objectives, train=train), run_dir=tmp_path / "b", resume=True, progress=False
    )
    assert resumed.resumed_from == 1
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "loss_1_mi" in straight.history[-1]


def test_a_batch_of_one_trains_without_error_and_adds_no_mi_term():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(1)
    objs, ctx = _prepare({"steps": 1, "estimators": "alternating"}, model, x, y)
    obj = objs.weighted[0][1]
    obj.estimator_step(x, x, model(x), model(x), y)  # a no-op step, not an error
    loss = obj.loss(ctx)
    torch.testing.assert_close(loss, F.cross_entropy(ctx.logits(pgd_view(1)), y))
    objs.after_step(ctx)


def test_a_resume_past_start_epoch_without_warm_up_still_warms_up():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(16)
    objs, _ = _prepare({"steps": 1, "start_epoch": 1}, model, x, y)
    obj = objs.weighted[0][1]
    objs.begin_epoch(3, lambda: [(x, y)])  # e.g. start_epoch was lowered before a resume
    assert obj.warmed_up and obj.active


def test_old_checkpoints_without_the_flag_load_and_warm_up():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8)
    objs, _ = _prepare({"steps": 1}, model, x, y)
    state = objs.state_dict()
    del state["0"]["warmed_up"]
    objs.load_state_dict(state)
    assert not objs.weighted[0][1].warmed_up


def test_a_start_epoch_after_the_last_epoch_warns():
    with pytest.warns(UserWarning, match="never"):
        tiny_policy(train={"epochs": 2}, objectives=[{"name": "mi", "params": {"start_epoch": 2}}])
