"""harden.ot (patch distributions, batched Sinkhorn over POT, IWD) and the IWD attack."""

import math
import warnings

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from harden.attacks.base import ATTACKS, restore_modes, save_modes
from harden.attacks.iwd import DEFAULT_RHO, IWDAttack, calibrate_rho, iwd_perturb
from harden.errors import DataError, PolicyError
from harden.ot import default_geometry, iwd, patches, self_cost, sinkhorn_cost
from harden.policy import ThreatModel
from harden.testing import TinyCNN, TinyMLP, synthetic_tensors, tiny_policy

F64 = torch.float64


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=F64)


def tiny_images(n=3, size=5, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------- patches


def test_patches_match_manual_slices():
    x = torch.rand(2, 3, 7, 6)
    p = patches(x, k=3, stride=1)
    assert p.shape == (2, 5 * 4, 3 * 9)
    for n, i, j in [(0, 0, 0), (1, 2, 3), (0, 4, 1)]:
        assert torch.equal(p[n, i * 4 + j], x[n, :, i : i + 3, j : j + 3].reshape(-1))


def test_default_geometry_and_sizes():
    assert default_geometry(28, 28) == (3, 1)
    assert default_geometry(32, 32) == (3, 1)
    assert default_geometry(33, 20) == (3, 2)
    assert default_geometry(224, 224) == (7, 7)
    assert patches(torch.rand(1, 1, 28, 28)).shape == (1, 676, 9)
    assert patches(torch.rand(1, 3, 64, 64)).shape == (1, 32 * 32, 27)  # stride 2, padded to 65
    assert patches(torch.rand(1, 3, 224, 224)).shape == (1, 32 * 32, 3 * 49)


@pytest.mark.parametrize("size", [33, 40, 100])
def test_default_strided_patches_cover_every_pixel(size):
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    seen = torch.unique(patches(x))
    assert seen.numel() == size * size


def test_patches_refuse_bad_input():
    with pytest.raises(DataError):
        patches(torch.rand(1, 8, 8))
    with pytest.raises(DataError):
        patches(torch.rand(1, 1, 2, 2), k=3)
    with pytest.raises(PolicyError):
        patches(torch.rand(1, 1, 8, 8), k=0)


# --------------------------------------------------------------------------- sinkhorn_cost vs POT


@pytest.mark.parametrize("reg", [0.05, 0.01])
def test_sinkhorn_cost_equals_pot_sinkhorn(reg):
    pa, pb = patches(tiny_images(seed=0)), patches(tiny_images(seed=1))
    ours = sinkhorn_cost(pa, pb, reg, tol=1e-10, max_iter=100_000)
    lin = sinkhorn_cost(pa, pb, reg, tol=1e-10, max_iter=100_000, value="linear")
    for i in range(pa.shape[0]):
        cost = ot.dist(pa[i], pb[i]) / pa.shape[2]
        a, b = uniform(pa.shape[1]), uniform(pb.shape[1])
        plan = ot.sinkhorn(a, b, cost, reg, stopThr=1e-13, numItermax=100_000)
        entropic = (plan * cost).sum() + reg * (plan * torch.log(plan)).sum()
        assert ours[i].item() == pytest.approx(entropic.item(), rel=1e-7, abs=1e-9)
        sharp = ot.sinkhorn2(a, b, cost, reg, stopThr=1e-13, numItermax=100_000)
        assert lin[i].item() == pytest.approx(sharp.item(), rel=1e-7, abs=1e-9)


def test_small_reg_tends_to_exact_emd():
    x, x2 = tiny_images(seed=0), tiny_images(seed=1)
    pa, pb = patches(x), patches(x2)
    emd = torch.stack([ot.emd2(uniform(9), uniform(9), ot.dist(pa[i], pb[i]) / 9) for i in range(3)])
    lin_errs, div_errs = [], []
    for reg in [1e-2, 5e-3, 3e-3]:  # smaller reg needs 1e4+ Sinkhorn iterations even on 9 points
        lin = sinkhorn_cost(pa, pb, reg, tol=1e-4, max_iter=100_000, value="linear")
        div = iwd(x, x2, reg=reg, tol=1e-4, max_iter=100_000)
        # each entropic term is within reg * log(n m) of its linear part, so the divergence too
        assert torch.all((div - emd).abs() <= 2 * reg * math.log(81))
        lin_errs.append((lin - emd).abs().max().item())
        div_errs.append((div - emd).abs().max().item())
    assert lin_errs[0] > lin_errs[1] > lin_errs[2]
    assert div_errs[0] > div_errs[1] > div_errs[2]
    assert max(lin_errs[2], div_errs[2]) < 0.015 * emd.min().item()


def test_gradients_are_pot_envelope_gradients():
    pa, pb = patches(tiny_images(seed=0)), patches(tiny_images(seed=1))
    ga, gb = pa.clone().requires_grad_(True), pb.clone().requires_grad_(True)
    (sinkhorn_cost(ga, gb, 0.05, tol=1e-9, max_iter=10_000).sum()).backward()
    ra, rb = pa.clone().requires_grad_(True), pb.clone().requires_grad_(True)
    cost = ot.batch.dist_batch(ra, rb) / 9
    res = ot.solve_batch(cost, 0.05, method="log_sinkhorn", tol=1e-9 / 3, max_iter=10_000, grad="envelope")
    res.value.sum().backward()
    assert torch.allclose(ga.grad, ra.grad, atol=1e-10)
    assert torch.allclose(gb.grad, rb.grad, atol=1e-10)


def test_sinkhorn_cost_refuses_bad_arguments():
    p = torch.rand(2, 4, 3)
    with pytest.raises(PolicyError, match="reg > 0"):
        sinkhorn_cost(p, p, reg=None)
    with pytest.raises(PolicyError):
        sinkhorn_cost(p, p, reg=0.0)
    with pytest.raises(DataError):
        sinkhorn_cost(p, torch.rand(3, 4, 3))
    with pytest.raises(DataError):
        sinkhorn_cost(p, p.double())


# --------------------------------------------------------------------------- iwd


def test_iwd_of_an_image_with_itself_is_zero():
    x = torch.rand(4, 1, 12, 12)
    assert torch.all(iwd(x, x).abs() <= 1e-7)
    assert torch.all(iwd(x, x.clone(), x_self=self_cost(x)).abs() <= 1e-7)


def test_iwd_is_nonnegative_and_grows_with_the_perturbation():
    x, _ = synthetic_tensors(8)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    values = torch.stack([iwd(x, (x + s * noise).clamp(0, 1)) for s in (0.05, 0.1, 0.2)])
    assert torch.all(values > 0)
    assert torch.all(values[1] > values[0])
    assert torch.all(values[2] > values[1])


def test_iwd_is_near_zero_for_a_rearrangement_of_patches():
    x, _ = synthetic_tensors(4, size=12)
    shifted = torch.roll(x, 1, dims=3)  # nearly the same patches, but a large pixel change
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert torch.all((shifted - x).flatten(1).norm(dim=1) > (noisy - x).flatten(1).norm(dim=1))
    assert torch.all(iwd(x, shifted) < iwd(x, noisy))


def test_iwd_gradients_are_finite_and_nonzero():
    x, _ = synthetic_tensors(4)
    adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    adv.requires_grad_(True)
    (grad,) = torch.autograd.grad(iwd(x, adv).sum(), adv)
    assert torch.isfinite(grad).all()
    assert torch.all(grad.flatten(1).norm(dim=1) > 0)
    # a small step against the gradient lowers the divergence
    with torch.no_grad():
        assert torch.all(iwd(x, adv - 1e-3 * grad.sign()) < iwd(x, adv))


def test_iwd_gradient_vanishes_at_x():
    x = torch.rand(2, 1, 8, 8)
    adv = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(iwd(x, adv).sum(), adv)
    assert grad.abs().max() < 1e-6


def test_batched_equals_per_example_and_chunked():
    x, _ = synthetic_tensors(6)
    adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    xd, ad = x.double(), adv.double()
    tight = {"tol": 1e-9, "max_iter": 100_000}
    batched = iwd(xd, ad, **tight)
    single = torch.cat([iwd(xd[i : i + 1], ad[i : i + 1], **tight) for i in range(6)])
    chunked = iwd(xd, ad, max_elems=1, **tight)
    assert torch.allclose(batched, single, rtol=1e-6, atol=1e-12)
    assert torch.allclose(batched, chunked, rtol=1e-6, atol=1e-12)
    # at the default (float32, tol 3e-3) batching changes values only within the solver's tolerance
    default_batched = iwd(x, adv)
    default_single = torch.cat([iwd(x[i : i + 1], adv[i : i + 1]) for i in range(6)])
    assert torch.allclose(default_batched, default_single, rtol=1e-2)
    assert torch.allclose(default_batched.double(), batched, rtol=1e-2)


def test_iwd_refuses_mismatched_shapes():
    with pytest.raises(DataError):
        iwd(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9))
    with pytest.raises(DataError):
        iwd(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), x_self=torch.zeros(3))


# --------------------------------------------------------------------------- the attack


@pytest.fixture(scope="module")
def trained():
    """A TinyCNN trained a few seeded steps on synthetic data, and held-out data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=3)
        x, y = synthetic_tensors(384, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for _ in range(3):
            for i in range(0, 384, 64):
                opt.zero_grad()
                F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
        model.eval()
    x_test, y_test = synthetic_tensors(96, seed=2)
    return model, x_test, y_test


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


def test_attack_respects_budget_box_and_lowers_accuracy(trained):
    model, x, y = trained
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


def test_tighter_budget_is_weaker(trained):
    model, x, y = trained
    loose = IWDAttack(ThreatModel(rho=2e-3), {"steps": 10})(model, x, y)
    tight = IWDAttack(ThreatModel(rho=2e-4), {"steps": 10})(model, x, y)
    assert acc(model, tight, y) > acc(model, loose, y)


def test_linf_cap_and_tiny_budget(trained):
    model, x, y = trained
    x, y = x[:16], y[:16]
    adv = IWDAttack(ThreatModel(rho=2e-3), {"steps": 8, "linf_cap": 0.05})(model, x, y)
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    attack = IWDAttack(ThreatModel(rho=1e-9), {"steps": 3})
    adv = attack(model, x, y)
    assert torch.all(iwd(x, adv) <= 1e-9 * 1.01)


def test_attack_restores_modes_and_leaves_params_alone(trained):
    model, x, y = trained
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


def test_attack_is_deterministic(trained):
    model, x, y = trained
    x, y = x[:16], y[:16]
    attack = IWDAttack(ThreatModel(rho=2e-3), {"steps": 5})
    torch.manual_seed(1)
    first = attack(model, x, y)
    torch.manual_seed(2)
    second = attack(model, x, y)
    assert torch.equal(first, second)


def test_iwd_perturb_for_training_objectives(trained):
    model, x, y = trained
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


def test_numpy_inputs_are_not_tensors():
    with pytest.raises(DataError):
        iwd(np.zeros((1, 1, 8, 8)), torch.zeros(1, 1, 8, 8))


@pytest.mark.gpu
def test_sinkhorn_cost_on_cuda_equals_the_cpu():
    pa, pb = patches(tiny_images(seed=0)), patches(tiny_images(seed=1))
    cpu = sinkhorn_cost(pa, pb, 0.05, tol=1e-10, max_iter=100_000)
    gpu = sinkhorn_cost(pa.cuda(), pb.cuda(), 0.05, tol=1e-10, max_iter=100_000)
    assert gpu.device.type == "cuda"
    # both converge (tol 1e-10) to the same fixed point; the test against POT holds at rel 1e-7 too
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- restarts, geometry, rho


def test_restarts_attack_only_the_survivors_from_random_starts_inside_the_cap(trained, monkeypatch):
    import harden.attacks.iwd as iwd_module

    model, x, y = trained
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


def test_restarts_only_add_fooled_examples_and_stay_in_budget(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    rho = 5e-4
    torch.manual_seed(0)
    one = IWDAttack(ThreatModel(rho=rho), {"steps": 4})
    adv1 = one(model, x, y)
    torch.manual_seed(0)
    three = IWDAttack(ThreatModel(rho=rho), {"steps": 4, "restarts": 3})
    adv3 = three(model, x, y)
    fooled1 = model(adv1).argmax(1) != y
    fooled3 = model(adv3).argmax(1) != y
    assert bool((fooled1 <= fooled3).all())  # a restart never loses an example the first run fooled
    assert torch.equal(adv3[fooled1], adv1[fooled1])  # ... and keeps the first run's example for it
    assert torch.all(iwd(x, adv3) <= rho * (1 + three.params.feasibility_tol))
    assert torch.allclose(three.last_iwd, iwd(x, adv3))


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
