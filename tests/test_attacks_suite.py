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


class NaNOffItsInputs(torch.nn.Module):
    """Class 0 (logits [1, 0]) on the inputs it knows, all-NaN logits on any other: argmax says 0 everywhere."""

    def __init__(self, known):
        super().__init__()
        self.known = known
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        seen = (x.flatten(1)[:, None, :] == self.known.flatten(1)[None]).all(2).any(1)
        out = torch.tensor([1.0, 0.0]).repeat(x.shape[0], 1) + 0 * self.dummy
        return torch.where(seen[:, None], out, torch.full_like(out, float("nan")))


def test_non_finite_logits_are_wrong_when_clean_and_broken_when_attacked():
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)  # the all-NaN row's argmax is class 0: y
    model = NaNOffItsInputs(x[1:])  # NaN on x[0]; class 0 on x[1:], NaN on every noisy copy
    assert model(x).argmax(1).tolist() == [0, 0, 0, 0]
    noise = ATTACKS.get("noise")(ThreatModel(eps=0.1), {"samples": 2})
    result = run_suite(model, x, y, [noise])
    assert result.clean_correct.tolist() == [False, True, True, True]
    assert result.broken_by == ["clean", "noise", "noise", "noise"]
    assert not bool(result.robust.any())
    right, counted = noise.score(model, x, y)  # the attack base's scoring agrees
    assert not bool(right.any()) and bool(counted.all())


class NaNAboveMean(torch.nn.Module):
    """Class 0 by a margin of ``10 - mean(x)``; NaN logits, and NaN gradients, once ``mean(x)`` passes ``limit``.

    ``log(limit - mean)`` is added to both logits: below the limit it moves neither the prediction
    nor the cross-entropy; beyond it, it is NaN. ``argmax`` of a NaN row is 0, the label here.
    """

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        m = x.flatten(1).mean(1)
        z = 10.0 - self.w * m
        return torch.stack([z, torch.zeros_like(z)], 1) + torch.log(self.limit - m)[:, None]


@pytest.mark.parametrize(
    ("name", "params", "norm"),
    [
        ("pgd", {"steps": 10}, "linf"),  # torch.sign(NaN) is 0: linf PGD stops in the NaN region by itself
        ("pgd", {"steps": 10}, "l2"),  # l2 steps divide by the gradient's norm: a NaN gradient makes NaN pixels
        ("pgd", {"steps": 10, "random_start": False}, "l2"),
        ("apgd_ce", {"steps": 10}, "linf"),
        ("apgd_ce", {"steps": 10}, "l2"),
    ],
)
def test_an_attack_that_drives_the_logits_to_nan_breaks_the_example_and_does_not_raise(name, params, norm):
    torch.manual_seed(0)
    means = torch.tensor([0.3, 0.7, 0.8]).view(3, 1, 1, 1)
    x = means + (torch.rand(3, 1, 8, 8) - 0.5) * 0.1  # |noise| <= 0.05: every pixel stays 0.1 inside [0, 1]
    x = x - x.flatten(1).mean(1).view(3, 1, 1, 1) + means  # exact means
    y = torch.zeros(3, dtype=torch.long)
    # The mean of x moves at most 0.1 in the ball (linf 0.1, or l2 0.8 = 0.1 * sqrt(64 pixels)). Limit 0.74: mean 0.3
    # never reaches it, mean 0.7 can (NaN logits), mean 0.8 is NaN clean. PGD's steps (0.025 on the mean) from 0.7
    # pass 0.74 at 0.75 rather than stop on the limit (log 0: -inf logits with a finite gradient).
    model = NaNAboveMean(0.74)
    assert model(x).argmax(1).tolist() == [0, 0, 0]  # argmax would call every example right
    eps = 0.1 if norm == "linf" else 0.8
    attack = build_attack(AttackSpec(name=name, params=params), ThreatModel(norm=norm, eps=eps))
    result = run_suite(model, x, y, [attack], keep_adversarial=True)
    assert result.clean_correct.tolist() == [True, True, False]
    assert result.broken_by == ["", name, "clean"]
    assert bool(torch.isfinite(result.x_adv).all())
    assert float(result.x_adv[1].mean()) > 0.74  # the point it returns is past the limit: NaN logits
    delta = (result.x_adv - x).flatten(1)
    assert float(delta.abs().amax() if norm == "linf" else delta.norm(dim=1).max()) <= eps * (1 + 1e-5)
    right, counted = attack.score(model, x[:2], y[:2])
    assert right.tolist() == [True, False] and bool(counted.all())


def test_run_suite_reports_each_attacks_ticks_as_a_share_of_the_cascade(trained_xy):
    model, x, y = trained_xy
    heard = []
    attacks = [
        ATTACKS.get("apgd_t")(ThreatModel(eps=0.01), {"steps": 3, "n_target_classes": 2}),
        ATTACKS.get("fgsm")(ThreatModel(eps=0.01)),
    ]
    before = attacks[0].on_progress
    run_suite(model, x, y, attacks, on_progress=lambda label, done: heard.append((label, done)))
    fractions = [d for _, d in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {label for label, d in heard if d <= 0.5} == {"apgd_t"} and heard[-1][0] == "fgsm"
    assert any(0 < d < 0.5 for _, d in heard)  # apgd_t ticked between its targets
    assert attacks[0].on_progress is before  # the hook is the caller's again


def test_run_suite_progress_stays_a_fraction_when_an_attack_fools_examples(trained_xy):
    """The fraction after each attack is (its position + 1) / attacks, whatever examples it fooled."""
    model, x, y = trained_xy
    heard = []
    attacks = [ATTACKS.get("fgsm")(ThreatModel(eps=0.5)), ATTACKS.get("fgsm")(ThreatModel(eps=0.5))]
    result = run_suite(model, x, y, attacks, on_progress=lambda label, done: heard.append((label, done)))
    assert result.broken_by.count("fgsm") > 1  # the first attack fooled examples past position 1
    assert heard == [("fgsm", 0.5), ("fgsm#2", 1.0)]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_standard_presets_white_box_attacks_are_not_weaker_than_the_reference(digits_cnn, norm):
    """preset standard screens APGD-T and shortens FAB-T: on the digits model it must not be measurably weaker
    than AutoAttack's reference settings (one-sided exact McNemar on the same examples; Square, identical in
    both presets, is left out)."""
    from scipy.stats import binomtest

    model, x, y = digits_cnn
    threat = ThreatModel(norm=norm, eps=0.1 if norm == "linf" else 0.5)
    outcomes = {}
    for preset in ("standard", "reference"):
        attacks = [build_attack(s, threat) for s in preset_specs(preset) if s.name != "square"]
        torch.manual_seed(0)
        outcomes[preset] = run_suite(model, x, y, attacks).robust
    standard, reference = outcomes["standard"], outcomes["reference"]
    assert bool(standard.any()) and bool((~standard).any())  # the comparison below tests something
    only_standard = int((standard & ~reference).sum())
    only_reference = int((reference & ~standard).sum())
    if only_standard > only_reference:
        p = binomtest(only_standard, only_standard + only_reference, 0.5, alternative="greater").pvalue
        assert p >= 1e-3, f"standard weaker on {only_standard} examples, stronger on {only_reference}: p = {p:.2g}"
