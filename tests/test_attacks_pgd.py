"""harden.attacks.pgd: PGD lowers accuracy, beats FGSM, restarts, steps, the l2 ball, losses and selection."""

import pytest
import torch
from helpers_attacks import Flaky, acc

from harden.attacks import ATTACKS, lp_norm
from harden.attacks.base import save_modes
from harden.policy import ThreatModel
from harden.testing import synthetic_tensors


def pgd(threat, **params):
    return ATTACKS.get("pgd")(threat, params)


def test_trained_model_is_accurate(trained_xy):
    model, x, y = trained_xy
    assert acc(model, x, y) >= 0.9


def test_pgd_lowers_accuracy(trained_xy):
    model, x, y = trained_xy
    clean = acc(model, x, y)
    adv = pgd(ThreatModel(eps=0.1), steps=10)(model, x, y)
    assert acc(model, adv, y) < clean - 0.2


def test_pgd_at_least_as_strong_as_fgsm(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.1)
    fgsm = acc(model, ATTACKS.get("fgsm")(threat)(model, x, y), y)
    strong = acc(model, pgd(threat, steps=20)(model, x, y), y)
    assert fgsm < acc(model, x, y)
    assert strong <= fgsm


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.6)])
def test_restarts_never_increase_accuracy(trained_xy, norm, eps):
    model, x, y = trained_xy
    threat = ThreatModel(norm=norm, eps=eps)
    results = []
    for restarts in (1, 2, 5):
        torch.manual_seed(3)
        adv = pgd(threat, steps=3, restarts=restarts)(model, x, y)
        results.append(acc(model, adv, y))
    assert results[0] < acc(model, x, y)
    assert results[2] <= results[1] <= results[0]


def test_more_steps_do_not_help_the_model(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.1)
    # one step size for both (the default 2.5 * eps / steps would differ): the first 2 iterates are the
    # same computation, and "misclassified" keeps each example's first fooling iterate, so whatever 2
    # steps fool, 20 steps fool with the same point: the fooled sets are nested by construction
    torch.manual_seed(1)
    few = acc(model, pgd(threat, steps=2, step_size=0.025, random_start=False)(model, x, y), y)
    torch.manual_seed(1)
    many = acc(model, pgd(threat, steps=20, step_size=0.025, random_start=False)(model, x, y), y)
    assert many <= few
    assert many < acc(model, x, y)


def test_pgd_l2_norm_bound_and_effect(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(norm="l2", eps=1.0)
    adv = pgd(threat, steps=10)(model, x, y)
    norms = lp_norm(adv - x, "l2")
    # d = 64: each norm's relative error <= d*u = 64 * 6e-8 = 3.8e-6 (< 1e-5); fl(x + delta) adds <= u
    # per pixel, sqrt(d)*u = 4.8e-7 in l2 (< 1e-6)
    assert float(norms.max()) <= 1.0 * (1 + 1e-5) + 1e-6
    assert float(norms.max()) > 0.5  # it uses the budget
    assert acc(model, adv, y) < acc(model, x, y)


def test_pgd_kl_loss_and_last_select(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.1)
    for params in ({"loss": "kl"}, {"select": "last"}):
        adv = pgd(threat, steps=3, **params)(model, x, y)
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert not torch.equal(adv, x)


def test_misclassified_select_keeps_fooling_iterates(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.1)
    torch.manual_seed(0)
    best = acc(model, pgd(threat, steps=5)(model, x, y), y)
    torch.manual_seed(0)
    last = acc(model, pgd(threat, steps=5, select="last")(model, x, y), y)
    assert best <= last


def test_pgd_modes_restored_when_forward_raises_mid_attack():
    model = Flaky(fail_at=2)
    model.train()
    model.net.features[1].eval()
    before = save_modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        pgd(ThreatModel(eps=0.1), steps=4)(model, *synthetic_tensors(8))
    assert model.calls == 2
    assert save_modes(model) == before


class Counting(torch.nn.Module):
    """Counts forward calls of the model it wraps (deterministic: every pass gives the same gradient)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eot_on_a_deterministic_model_repeats_each_pass_and_changes_nothing(trained_xy, norm):
    model, x, y = trained_xy
    threat = ThreatModel(norm=norm, eps=0.1 if norm == "linf" else 0.5)
    runs = {}
    for eot in (1, 2):
        net = Counting(model)
        torch.manual_seed(3)
        runs[eot] = (pgd(threat, steps=4, select="last", eot=eot)(net, x, y), net.calls)
    # equal passes average to themselves exactly in floating point: (g + g) / 2 == g, bit for bit
    assert torch.equal(runs[2][0], runs[1][0])
    assert runs[1][1] == 4 and runs[2][1] == 8  # one pass per step, then eot passes per step
