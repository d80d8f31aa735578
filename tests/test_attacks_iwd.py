"""harden.attacks.iwd: the IWD attack (budget, box, strength, restarts, determinism) and calibrate_rho."""

import warnings

import pytest
import torch

from harden.attacks.base import ATTACKS, restore_modes, save_modes
from harden.attacks.iwd import DEFAULT_RHO, IWDAttack, calibrate_rho, iwd_perturb
from harden.errors import PolicyError
from harden.ot import iwd
from harden.policy import ThreatModel
from harden.testing import TinyCNN, TinyMLP, synthetic_tensors, tiny_policy


@torch.no_grad()
def acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def test_registered_and_unbounded():
    assert ATTACKS.get("iwd") is IWDAttack
    assert IWDAttack.bounded is False
    assert IWDAttack(ThreatModel()).rho == DEFAULT_RHO
    assert IWDAttack(ThreatModel(rho=1e-3)).rho == 1e-3


def test_params_are_validated():
    with pytest.raises(PolicyError, match="steps"):
        IWDAttack(ThreatModel(), {"steps": 0})
    with pytest.raises(PolicyError):
        IWDAttack(ThreatModel(), {"nonsense": 1})
    with pytest.raises(PolicyError):
        iwd_perturb(TinyMLP(num_classes=2), torch.rand(1, 1, 8, 8), torch.tensor([0]), rho=0.0)


def test_attack_respects_budget_box_and_lowers_accuracy(trained_xy):
    model, x, y = trained_xy
    rho = 2e-3
    attack = IWDAttack(ThreatModel(rho=rho), {"steps": 20})
    adv = attack(model, x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    recomputed = iwd(x, adv)
    assert torch.all(recomputed <= rho * (1 + attack.params.feasibility_tol))
    assert torch.allclose(attack.last_iwd, recomputed)
    clean, robust = acc(model, x, y), acc(model, adv, y)
    assert clean > 0.9
    assert robust < clean - 0.3
    # the budget is not an l_p ball: the perturbation is far from tiny
    assert (adv - x).abs().max() > 0.1


def test_tighter_budget_is_weaker(trained_xy):
    model, x, y = trained_xy
    loose = IWDAttack(ThreatModel(rho=2e-3), {"steps": 10})(model, x, y)
    tight = IWDAttack(ThreatModel(rho=2e-4), {"steps": 10})(model, x, y)
    assert acc(model, tight, y) > acc(model, loose, y)


def test_linf_cap_and_tiny_budget(trained_xy):
    model, x, y = trained_xy
    x, y = x[:16], y[:16]
    adv = IWDAttack(ThreatModel(rho=2e-3), {"steps": 8, "linf_cap": 0.05})(model, x, y)
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    attack = IWDAttack(ThreatModel(rho=1e-9), {"steps": 3})
    adv = attack(model, x, y)
    # no 0.02 step fits in 1e-9, so adv is x; the three OT terms of IWD(x, x) are then one computation
    assert torch.equal(adv, x) and torch.all(iwd(x, adv) == 0)


def test_attack_restores_modes_and_leaves_params_alone(trained_xy):
    model, x, y = trained_xy
    model.train()
    model.features[1].eval()  # a mixed state, restored exactly
    model.zero_grad(set_to_none=True)
    before = save_modes(model)
    try:
        IWDAttack(ThreatModel(rho=1e-3), {"steps": 3})(model, x[:8], y[:8])
        assert save_modes(model) == before
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_attack_is_deterministic(trained_xy):
    model, x, y = trained_xy
    x, y = x[:16], y[:16]
    attack = IWDAttack(ThreatModel(rho=2e-3), {"steps": 5})
    torch.manual_seed(1)
    first = attack(model, x, y)
    torch.manual_seed(2)
    second = attack(model, x, y)
    assert torch.equal(first, second)


def test_iwd_perturb_for_training_objectives(trained_xy):
    model, x, y = trained_xy
    modes = save_modes(model)
    res = iwd_perturb(model, x[:16], y[:16], rho=2e-3, steps=5)
    restore_modes(model, modes)
    assert res.x_adv.shape == (16, 1, 8, 8) and res.iwd.shape == (16,) and res.fooled.dtype == torch.bool
    with torch.no_grad():
        assert torch.equal(res.fooled, model(res.x_adv).argmax(1) != y[:16])


@pytest.mark.slow
def test_attack_on_mnist_sized_images():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=10).eval()
    x = torch.rand(4, 1, 28, 28) * 0.3
    y = torch.arange(4)
    attack = IWDAttack(ThreatModel(rho=1e-3), {"steps": 3})
    adv = attack(model, x, y)
    assert torch.all(iwd(x, adv) <= 1e-3 * 1.01)
    assert attack.last_iwd.shape == (4,)


def test_restarts_attack_only_the_survivors_from_random_starts_inside_the_cap(trained_xy, monkeypatch):
    import harden.attacks.iwd as iwd_module

    model, x, y = trained_xy
    x, y = x[:24], y[:24]
    calls = []
    real = iwd_module.iwd_perturb

    def recording(model, x, y, rho, **kwargs):
        res = real(model, x, y, rho, **kwargs)
        calls.append((x.clone(), kwargs.get("start"), res.fooled.clone()))
        return res

    monkeypatch.setattr(iwd_module, "iwd_perturb", recording)
    torch.manual_seed(0)
    attack = IWDAttack(ThreatModel(rho=5e-4), {"steps": 3, "restarts": 3, "linf_cap": 0.01, "step_size": 0.05})
    adv = attack(model, x, y)
    assert calls[0][1] is None and len(calls) >= 2
    survivors = x[~calls[0][2]]
    assert torch.equal(calls[1][0], survivors)  # the second run attacks exactly the examples not fooled
    start = calls[1][1]
    assert start is not None and not torch.equal(start, survivors)  # a random start ...
    assert float((start - survivors).abs().max()) <= 0.01 + 1e-6  # ... inside the l_inf cap (float32)
    assert float((adv - x).abs().max()) <= 0.01 + 1e-6  # and so is every returned example


def test_restarts_only_add_fooled_examples_and_stay_in_budget(trained_xy):
    model, x, y = trained_xy
    x, y = x[:32], y[:32]
    # one 8x8 image (36 patches) per Sinkhorn chunk: POT stops a chunk on the max over its images, so
    # with one image per chunk an example's IWD does not depend on which other rows share its batch,
    # and the IWD of a restart's winner (found on a sub-batch) equals a recompute on the whole batch
    params = {"steps": 6, "max_elems": 36 * 36}
    rho = 1e-3
    torch.manual_seed(0)
    one = IWDAttack(ThreatModel(rho=rho), params)
    adv1 = one(model, x, y)
    torch.manual_seed(0)
    three = IWDAttack(ThreatModel(rho=rho), {**params, "restarts": 3})
    adv3 = three(model, x, y)
    with torch.no_grad():
        fooled1 = model(adv1).argmax(1) != y
        fooled3 = model(adv3).argmax(1) != y
    assert int(fooled3.sum()) > int(fooled1.sum())  # a restart wins something, so the checks below bite
    assert bool((fooled1 <= fooled3).all())  # a restart never loses an example the first run fooled
    assert torch.equal(adv3[fooled1], adv1[fooled1])  # ... and keeps the first run's example for it
    d = iwd(x, adv3, max_elems=36 * 36)
    assert torch.equal(three.last_iwd, d)
    assert torch.all(d <= rho * (1 + three.params.feasibility_tol))


def test_training_and_the_attack_share_the_default_geometry():
    from harden.objectives.iwd_at import IWDATParams

    train, attack = IWDATParams(), IWDAttack(ThreatModel()).params
    assert (train.patch_size, train.stride) == (attack.patch_size, attack.stride) == (None, None)


def test_a_policy_training_and_evaluating_at_two_geometries_warns():
    objectives = [{"name": "iwd_at", "params": {"steps": 1, "patch_size": 3, "stride": 2}}]
    same = {"attacks": [{"name": "iwd", "params": {"steps": 1, "patch_size": 3, "stride": 2}}]}
    other = {"attacks": [{"name": "iwd", "params": {"steps": 1}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_policy(objectives=objectives, verify=same)
    with pytest.warns(UserWarning, match="one geometry only"):
        tiny_policy(objectives=objectives, verify=other)
    explicit_default = {"attacks": [{"name": "iwd", "params": {"steps": 1, "patch_size": 3, "stride": 1}}]}
    with warnings.catch_warnings():  # None means 3x3 at stride 1 up to 32 px: the same geometry
        warnings.simplefilter("error")
        tiny_policy(objectives=[{"name": "iwd_at", "params": {"steps": 1}}], verify=explicit_default)


def test_calibrated_rho_grows_with_the_noise_and_depends_on_the_geometry():
    x = synthetic_tensors(16, seed=7)[0]
    small, large = calibrate_rho(x, 0.1, k=3, stride=1), calibrate_rho(x, 0.3, k=3, stride=1)
    assert 0 < small < large
    assert calibrate_rho(x, 0.2, k=3, stride=1) != calibrate_rho(x, 0.2, k=4, stride=4)
    assert calibrate_rho(x, 0.2, k=3, stride=2) == calibrate_rho(x, 0.2, k=3, stride=2)  # seeded
    with pytest.raises(PolicyError, match="amplitude"):
        calibrate_rho(x, 0.0)
