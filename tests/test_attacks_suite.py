"""harden.attacks.suite: the worst-case cascade (run_suite), its bookkeeping, attack order and presets."""

import itertools

import pytest
import torch
from helpers_attacks import Flaky, acc

import harden
from harden.attacks import ATTACKS, build_attack, run_suite
from harden.attacks.base import restore_modes, save_modes
from harden.attacks.suite import order_attacks, preset_specs
from harden.policy import AttackSpec, ThreatModel
from harden.testing import TinyCNN, synthetic_tensors


def suite_attacks(threat, random_start):
    return [
        build_attack(AttackSpec(name="fgsm"), threat),
        build_attack(AttackSpec(name="pgd", params={"steps": 10, "random_start": random_start}), threat),
        build_attack(AttackSpec(name="pgd", params={"steps": 10, "random_start": random_start}), threat),
    ]


def check_suite_consistency(result, x):
    n = x.shape[0]
    assert result.labels == ["fgsm", "pgd", "pgd#2"]
    assert len(result.broken_by) == n
    assert result.clean_correct.shape == (n,)
    accs = [float(result.clean_correct.float().mean())] + [
        float(result.still_correct[k].float().mean()) for k in result.labels
    ]
    assert all(b <= a for a, b in itertools.pairwise(accs))  # non-increasing
    assert torch.equal(result.robust, result.still_correct["pgd#2"])
    prev = result.clean_correct
    for label in result.labels:
        now = result.still_correct[label]
        assert not (now & ~prev).any()  # nobody comes back to life
        broken_here = [i for i in range(n) if prev[i] and not now[i]]
        assert broken_here == [i for i, b in enumerate(result.broken_by) if b == label]
        prev = now
    for i, b in enumerate(result.broken_by):
        assert (b == "clean") == (not result.clean_correct[i])
        assert (b == "") == bool(result.robust[i])


def test_suite_deterministic_attacks_equal_the_and_of_standalone(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.1)
    attacks = suite_attacks(threat, random_start=False)
    result = run_suite(model, x, y, attacks)
    check_suite_consistency(result, x)
    standalone = torch.ones_like(y, dtype=torch.bool)
    with torch.no_grad():
        standalone &= model(x).argmax(1) == y
        for attack in attacks:
            standalone &= model(attack(model, x, y)).argmax(1) == y
    assert torch.equal(result.robust, standalone)
    # the test is not vacuous: both attacks break examples, some survive
    assert result.broken_by.count("fgsm") > 0
    assert result.broken_by.count("pgd") > 0
    assert 0 < int(result.robust.sum()) < int(result.clean_correct.sum())


def test_suite_with_random_starts_is_at_least_each_standalone(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.1)
    attacks = suite_attacks(threat, random_start=True)
    torch.manual_seed(0)
    result = run_suite(model, x, y, attacks)
    check_suite_consistency(result, x)
    robust = float(result.robust.float().mean())
    for attack in attacks:
        torch.manual_seed(0)
        assert robust <= acc(model, attack(model, x, y), y)
    assert robust < float(result.clean_correct.float().mean())


def test_suite_restores_modes_when_an_attack_raises():
    model = Flaky(fail_at=2)  # the clean prediction is call 1, the first attack's forward call 2
    model.train()
    model.net.features[1].eval()
    before = save_modes(model)
    x, y = synthetic_tensors(8)
    with pytest.raises(RuntimeError, match="boom"):
        run_suite(model, x, y, suite_attacks(ThreatModel(eps=0.1), random_start=False))
    assert save_modes(model) == before


def test_suite_restores_modes_and_extends(trained_xy):
    model, x, y = trained_xy
    model.train()
    model.features[1].eval()
    before = save_modes(model)
    try:
        attacks = suite_attacks(ThreatModel(eps=0.1), random_start=False)
        first = run_suite(model, x[:40], y[:40], attacks)
        assert save_modes(model) == before
        second = run_suite(model, x[40:], y[40:], attacks)
        first.extend(second)
        whole = run_suite(model, x, y, attacks)
    finally:
        restore_modes(model, {name: False for name in before})
    assert first.broken_by == whole.broken_by
    assert torch.equal(first.robust, whole.robust)
    assert set(first.seconds) == set(whole.labels)


def test_run_suite_keeps_the_worst_case_input_per_example():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).eval()
    x, y = synthetic_tensors(20, seed=4)
    attacks = [build_attack(AttackSpec(name="pgd", params={"steps": 5}), harden.ThreatModel(eps=0.1))]
    assert run_suite(model, x, y, attacks).x_adv is None
    r = run_suite(model, x, y, attacks, keep_adversarial=True)
    assert r.x_adv is not None and r.x_adv.shape == x.shape
    assert torch.equal(r.x_adv[~r.clean_correct], x[~r.clean_correct])  # not attacked: the clean input
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    hit = torch.tensor([b == "pgd" for b in r.broken_by])
    assert bool((pred[hit] != y[hit]).all())
    both = run_suite(model, x[:8], y[:8], attacks, keep_adversarial=True)
    both.extend(run_suite(model, x[8:], y[8:], attacks, keep_adversarial=True))
    assert both.x_adv is not None and both.x_adv.shape == x.shape


def test_suite_orders_white_box_first_and_separates_unbounded():
    threat = ThreatModel(eps=0.1)
    attacks = [ATTACKS.get(n)(threat) for n in ("noise", "invariance", "fgsm", "pgd")]
    lp, other = order_attacks(attacks)
    assert [a.name for a in lp] == ["fgsm", "pgd", "noise"]
    assert [a.name for a in other] == ["invariance"]


def test_label_changing_attacks_are_kept_out_of_the_lp_cascade():
    threat = ThreatModel(eps=0.1)
    atks = [ATTACKS.get(n)(threat) for n in ("invariance_examples", "pgd", "noise")]
    lp, other = order_attacks(atks)
    assert [a.name for a in lp] == ["pgd", "noise"] and [a.name for a in other] == ["invariance_examples"]


def test_presets_name_known_attacks():
    assert [s.name for s in preset_specs("standard")] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert preset_specs(None) == []
    with pytest.raises(ValueError, match="preset"):
        preset_specs("fast")
