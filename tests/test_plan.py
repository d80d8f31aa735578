"""harden.plan: the run plan counts follow the policy, and the estimate is their product with one measured pass."""

import pytest
import torch
from torch import nn

from harden.plan import make_plan, measure_pass_seconds
from harden.testing import TinyCNN, tiny_policy

DATA = {"n_train": 384, "n_test": 192, "image_shape": (1, 8, 8), "num_classes": 3}


def plan_of(seconds=None, **updates):
    return make_plan(tiny_policy(**updates), **DATA, seconds_per_pass=seconds)


def test_pgd_at_costs_its_steps_plus_one_pass_per_step():
    plan = plan_of(objectives=[{"name": "pgd_at", "params": {"steps": 5}}])
    assert (plan.passes_per_step, plan.exact) == (6.0, True)
    assert plan.batches_per_epoch == 6  # 384 / 64
    assert "-> 6 forward-backward passes per step" in plan.lines()[1]
    assert plan_of(objectives=[{"name": "ce"}]).passes_per_step == 1.0


def test_a_view_shared_by_two_objectives_is_counted_once_and_the_sum_is_approximate():
    # pgd_at and mi ask for the same PGD-5 view: 5 attack passes, then 1 (pgd_at) + 2 (mi: clean + adversarial)
    plan = plan_of(
        objectives=[{"name": "pgd_at", "params": {"steps": 5}}, {"name": "mi", "params": {"steps": 5}, "weight": 0.5}]
    )
    assert (plan.passes_per_step, plan.exact) == (8.0, False)
    assert "about 8 forward-backward passes" in plan.lines()[1]


def test_every_and_weight_zero_follow_the_trainer():
    # ce each step (1) + pgd_at every 2nd step ((4 + 1) / 2); trades at weight 0 is not trained
    plan = plan_of(
        objectives=[
            {"name": "ce"},
            {"name": "pgd_at", "params": {"steps": 4}, "every": 2},
            {"name": "trades", "weight": 0.0},
        ]
    )
    assert plan.passes_per_step == pytest.approx(1 + 5 / 2)
    assert "trades" not in plan.lines()[1]
    assert "every 2 steps" in plan.lines()[1]


def test_trades_is_about_its_steps_plus_two():
    plan = plan_of(objectives=[{"name": "trades", "params": {"steps": 3}}])
    assert (plan.passes_per_step, plan.exact) == (5.0, False)


def test_the_estimate_is_the_pass_counts_times_the_measured_pass():
    one = plan_of(1e-2, train={"epochs": 1})
    two = plan_of(1e-2, train={"epochs": 2})
    assert one.seconds() is not None and two.seconds() is not None
    assert two.seconds()["train"] == pytest.approx(2 * one.seconds()["train"])
    assert two.seconds()["probe"] == pytest.approx(2 * one.seconds()["probe"])
    assert one.seconds()["verify"] == pytest.approx(two.seconds()["verify"])
    assert one.seconds()["train"] == pytest.approx(1 * 6 * one.passes_per_step * 1e-2)
    assert "estimate" in one.lines()[-1] and one.lines()[-1].startswith("time")
    assert plan_of(None).seconds() is None
    assert not any(line.startswith("time") for line in plan_of(None).lines())


def test_the_lines_name_attacks_checks_smoothing_and_the_onnx_attack():
    plan = plan_of(
        verify={
            "attacks": [
                {"name": "pgd", "params": {"steps": 7, "restarts": 2}},
                {"name": "invariance", "n_examples": 10},
            ],
            "n_examples": 50,
            "checks": False,
        },
        certify={"smoothing": True, "n": 100, "n_examples": 20},
        export={"verify_examples": 30},
    )
    text = "\n".join(plan.lines())
    assert "50 test examples" in text and "pgd (steps 7, restarts 2)" in text and "n=10" in text
    assert "checks off" in text
    assert "smoothing: 100 noise draws (sigma 0.25) on 20 examples" in text
    assert "its session attacked on 30 examples" in text
    more = plan_of(verify={"checks": True, "check_examples": 16, "check_steps": 3, "eps_sweep": [0.1, 0.2]})
    assert "checks on (16 examples, PGD-3); eps sweep 0.1, 0.2 (PGD-10)" in "\n".join(more.lines())
    # attack passes follow steps x restarts: doubling the restarts doubles the verify count's attack part
    a = plan_of(verify={"attacks": [{"name": "pgd", "params": {"steps": 7, "restarts": 1}}], "checks": False})
    b = plan_of(verify={"attacks": [{"name": "pgd", "params": {"steps": 7, "restarts": 2}}], "checks": False})
    clean = 192 / 3 / 64  # one forward of every test example (a third of a pass), in batches of 64
    assert b.passes["verify"] - clean == pytest.approx(2 * (a.passes["verify"] - clean))


def test_the_checks_count_their_runs_and_the_sweep_radii_beside_the_suites_own_point():
    """Upper bound per check example: 2 runs of check_steps (the suite's outcome continued, one restart), one run of
    sweep_steps per radius other than the threat's (that one is the suite's), and the large-eps and unbounded runs."""
    spec = {"check_examples": 16, "check_steps": 3, "sweep_steps": 5, "eps_sweep": [0.05, 0.1, 0.2]}
    policy = tiny_policy(verify=spec)
    assert policy.threat.eps == 0.1  # so the radius 0.1 costs nothing
    bs = policy.data.batch_size  # the plan counts passes of a training batch
    assert plan_of(verify=spec).passes["checks"] == pytest.approx(16 * (3 * 2 + 5 * (2 + 2)) / bs)
    off = plan_of(verify={**spec, "checks": False})
    assert off.passes["checks"] == pytest.approx(16 * 5 * 2 / bs)  # the sweep runs without the checks
    assert "checks off; eps sweep 0.05, 0.1, 0.2 (PGD-5, 16 examples)" in "\n".join(off.lines())


def test_measuring_a_pass_leaves_the_model_and_the_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.rand(8, 1, 8, 8), torch.arange(8) % 3)
    state = torch.random.get_rng_state()
    seconds = measure_pass_seconds(model, batch)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), state)
    assert measure_pass_seconds(TinyCNN(num_classes=3), (torch.rand(4, 1, 8, 8), torch.arange(4) % 3)) > 0


def test_a_screened_targeted_attack_costs_its_screen_runs_plus_the_full_runs():
    from harden.plan import _attack_cost

    ref, what_ref = _attack_cost("apgd_t", {"steps": 100, "n_target_classes": 9}, 10)
    screened, what = _attack_cost("apgd_t", {"steps": 100, "n_target_classes": 9, "screen_steps": 10}, 10)
    assert ref == 900 and screened == 9 * 10 + 100 and "screened with 10 steps, 1 in full" in what
    two, _ = _attack_cost("fab_t", {"steps": 100, "n_target_classes": 3, "screen_steps": 5, "full_targets": 2}, 4)
    assert two == 3 * 5 + 2 * 100 and "screened" not in what_ref
