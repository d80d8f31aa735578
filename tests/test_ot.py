"""harden.ot: patch distributions, batched Sinkhorn against POT, and the internal Wasserstein distance (IWD)."""

import math

import numpy as np
import ot
import pytest
import torch

from harden.errors import DataError, PolicyError
from harden.ot import default_geometry, iwd, patches, self_cost, sinkhorn_cost
from harden.testing import synthetic_tensors

F64 = torch.float64


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=F64)


def tiny_images(n=3, size=5, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


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
        # each entropic term is within reg * log(n m) of its linear part, so the divergence too (weights
        # 1 + 1/2 + 1/2); plus Sinkhorn stopped at tol 1e-4: each dual value within tol * max C (C <= 1)
        assert torch.all((div - emd).abs() <= 2 * reg * math.log(81) + 2 * 1e-4)
        lin_errs.append((lin - emd).abs().max().item())
        div_errs.append((div - emd).abs().max().item())
    assert lin_errs[0] > lin_errs[1] > lin_errs[2]
    assert div_errs[0] > div_errs[1] > div_errs[2]
    # a regression level, not a bound (the bound above is 2 * 3e-3 * log 81 + 2e-4): float64 and seeded,
    # so machine-independent to ~1e-15; measured 7.1e-4 vs 0.015 * emd.min() = 1.08e-3
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


def test_iwd_of_an_image_with_itself_is_zero():
    x = torch.rand(4, 1, 12, 12)
    # the three OT terms are the same float32 computation on equal patch sets: exactly 0
    assert torch.all(iwd(x, x) == 0)
    assert torch.all(iwd(x, x.clone(), x_self=self_cost(x)) == 0)


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
    # a small step against the gradient lowers the divergence: the dual value's error is second order,
    # reg * tol^2 / 2 = 2.3e-7 per OT term at tol 3e-3, <= 5e-4 of IWD ~ 1e-3; the step moves IWD by ~2%
    with torch.no_grad():
        assert torch.all(iwd(x, adv - 1e-3 * grad.sign()) < iwd(x, adv))


def test_iwd_gradient_vanishes_at_x():
    # at a = b the envelope gradient is bounded by the marginal violation: |g| <= (1/D) 2 tol/sqrt(n)
    # max|b| = (1/9)(2 * 1e-9 / 6) ~ 4e-11 at tol 1e-9 (D = 9 pixels per patch, n = 36 patches), plus
    # float64 rounding; at the float32 default (tol 3e-3) the same bound is only 1.1e-4
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    adv = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(iwd(x, adv, tol=1e-9, max_iter=100_000).sum(), adv)
    assert grad.abs().max() < 1e-9


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
    # at the default (float32, tol 3e-3) batching changes values only within the solver's tolerance:
    # the dual error is second order, |delta| <= 2 * reg * tol^2 / 2 ~ 4.5e-7 on IWD ~ 1e-3 (5e-4
    # relative, 20x below rtol 1e-2)
    default_batched = iwd(x, adv)
    default_single = torch.cat([iwd(x[i : i + 1], adv[i : i + 1]) for i in range(6)])
    assert torch.allclose(default_batched, default_single, rtol=1e-2)
    assert torch.allclose(default_batched.double(), batched, rtol=1e-2)


def test_iwd_refuses_mismatched_shapes():
    with pytest.raises(DataError):
        iwd(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9))
    with pytest.raises(DataError):
        iwd(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), x_self=torch.zeros(3))


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
