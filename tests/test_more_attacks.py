import pytest
import torch

from harden.attacks import ATTACKS
from harden.attacks.base import AttackEnv
from harden.attacks.invariance import rotate_shift
from harden.attacks.suite import order_attacks, preset_specs
from harden.policy import ThreatModel
from harden.testing import synthetic_tensors, tiny_policy


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_noise_is_weaker_than_pgd_and_stays_in_ball(trained):
    x, y = synthetic_tensors(128, seed=2)
    threat = ThreatModel(eps=0.15)
    torch.manual_seed(0)
    noisy = ATTACKS.get("noise")(threat, {"samples": 5})(trained, x, y)
    pgd = ATTACKS.get("pgd")(threat, {"steps": 10})(trained, x, y)
    assert (noisy - x).abs().max() <= 0.15 + 1e-6
    assert _acc(trained, pgd, y) < _acc(trained, noisy, y)


def test_noise_l2_has_norm_eps_before_clipping(trained):
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    out = ATTACKS.get("noise")(ThreatModel(norm="l2", eps=0.5), {"samples": 1})(trained, x, y)
    norms = (out - x).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((4,), 0.5), atol=1e-4)


def test_rotate_shift_identity_and_shift():
    x = torch.rand(2, 1, 9, 9)
    assert torch.allclose(rotate_shift(x, 0.0, 0.0, 0.0), x, atol=1e-5)
    shifted = rotate_shift(x, 0.0, 2.0, 0.0)
    assert torch.allclose(shifted[..., 2:], x[..., :-2], atol=1e-5)
    assert float(shifted[..., :2].abs().max()) == 0.0


def test_invariance_finds_the_transform_and_reports_only_fooled(trained):
    x, y = synthetic_tensors(64, seed=2)
    atk = ATTACKS.get("invariance")(ThreatModel(eps=0.1), {"angles": 5, "shifts": 3})
    assert len(atk.grid()) == 45 and atk.grid()[0] == (0.0, 0.0, 0.0)
    out = atk(trained, x, y)
    changed = (out - x).flatten(1).abs().amax(1) > 0
    with torch.no_grad():
        fooled = trained(out).argmax(1) != y
    assert bool((fooled | ~changed).all())  # anything changed was changed because it fools
    assert _acc(trained, out, y) < _acc(trained, x, y)


def test_transfer_trains_a_surrogate_and_transfers(trained):
    policy = tiny_policy(train={"epochs": 2})
    atk = ATTACKS.get("transfer")(policy.threat, {"epochs": 2, "steps": 10})
    state = torch.get_rng_state()
    atk.prepare(AttackEnv(policy=policy))
    assert torch.equal(state, torch.get_rng_state())  # surrogate training does not touch the caller's RNG
    assert atk.surrogate is not None and atk.surrogate is not trained
    x, y = synthetic_tensors(128, seed=2)
    adv = atk(trained, x, y)
    assert (adv - x).abs().max() <= policy.threat.eps + 1e-6
    assert _acc(trained, adv, y) < _acc(trained, x, y)


def test_suite_orders_white_box_first_and_separates_unbounded():
    threat = ThreatModel(eps=0.1)
    attacks = [ATTACKS.get(n)(threat) for n in ("noise", "invariance", "fgsm", "pgd")]
    lp, other = order_attacks(attacks)
    assert [a.name for a in lp] == ["fgsm", "pgd", "noise"]
    assert [a.name for a in other] == ["invariance"]


def test_presets_name_known_attacks():
    assert [s.name for s in preset_specs("standard")] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert preset_specs(None) == []
    with pytest.raises(ValueError, match="preset"):
        preset_specs("fast")
