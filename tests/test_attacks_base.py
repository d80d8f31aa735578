"""harden.attacks.base: the projection onto the threat model, parameter and threat validation, default scoring."""

import pytest
import torch

import harden
from harden.attacks import ATTACKS, lp_norm, project
from harden.attacks.base import input_grad, loss_grad
from harden.policy import ThreatModel
from harden.testing import synthetic_tensors


def test_project_linf_and_l2():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 4, 4)
    far = torch.rand(6, 1, 4, 4) * 3 - 1
    p = project(far, x, "linf", 0.05)
    assert float((p - x).abs().max()) <= 0.05 + 1e-7
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    p2 = project(far, x, "l2", 0.3)
    # float32, u = 2^-24, 16 pixels: the norm inside project and lp_norm's are each within
    # gamma_16 + u (relative) of exact, eps/norm and delta * factor round once each (u), eps itself
    # once (u); x + delta rounds by at most 2^-24 per pixel (values below 2; clamping to [0, 1] only
    # moves a pixel toward x, which is in the box), 4 * 2^-24 in l2 over 16 pixels, and p2 - x once
    # more (u). Hence 0.3 * (1 + 2 gamma_16 + 8u) + 4 * 2^-24, about 0.3 + 1e-6.
    u = 2.0**-24
    gamma_16 = 16 * u / (1 - 16 * u)
    assert float(lp_norm(p2 - x, "l2").max()) <= 0.3 * (1 + 2 * gamma_16 + 8 * u) + 4 * u
    assert float(p2.min()) >= 0 and float(p2.max()) <= 1
    near = (x + 0.001).clamp(0, 1)
    torch.testing.assert_close(project(near, x, "l2", 0.3), near)


def test_bad_threat_or_params_raise():
    with pytest.raises(harden.ThreatModelError, match="ThreatModel"):
        ATTACKS.get("pgd")({"eps": 0.1})
    with pytest.raises(harden.PolicyError, match="steps"):
        ATTACKS.get("pgd")(ThreatModel(), {"steps": 0})
    with pytest.raises(harden.PolicyError):
        ATTACKS.get("fgsm")(ThreatModel(), {"steps": 3})


@pytest.mark.parametrize("name", ["pgd", "invariance"])
def test_default_score_is_accuracy_on_the_attacked_input(trained, name):
    x, y = synthetic_tensors(32, seed=4)
    atk = ATTACKS.get(name)(ThreatModel(eps=0.1), {"angles": 3} if name == "invariance" else {"steps": 3})
    torch.manual_seed(0)
    right, counted = atk.score(trained, x, y)
    torch.manual_seed(0)
    with torch.no_grad():
        expect = trained(atk(trained, x, y)).argmax(1) == y
    assert torch.equal(right, expect) and bool(counted.all())


class SignFlip(torch.nn.Module):
    """Logits ``(A + s B) x`` with ``s`` = +1, -1, +1, ... on successive calls: a random sign, made countable.

    Integer weights and inputs in quarters keep every sum exact in float32, so means are exact.
    """

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("a", torch.randint(-4, 5, (3, 16), generator=gen).float())
        self.register_buffer("b", torch.randint(-4, 5, (3, 16), generator=gen).float())
        self.calls = 0

    def forward(self, x):
        s = 1.0 if self.calls % 2 == 0 else -1.0
        self.calls += 1
        return x.flatten(1) @ (self.a + s * self.b).T


@pytest.mark.parametrize("pairs", [1, 3])
def test_eot_averages_the_passes_exactly(pairs):
    net = SignFlip()
    x = torch.randint(0, 5, (4, 1, 4, 4)).float() / 4

    def first_logit(z):
        return z[:, 0]

    logits, loss, grad = loss_grad(net, x, first_logit, eot=2 * pairs)
    # 2k passes: k with A + B and k with A - B, so every B term cancels and the means are A's alone
    assert net.calls == 2 * pairs
    assert torch.equal(grad, net.a[0].view(1, 1, 4, 4).expand_as(x))
    assert torch.equal(logits, x.flatten(1) @ net.a.T) and torch.equal(loss, (x.flatten(1) @ net.a.T)[:, 0])
    one = SignFlip()
    _, g1 = input_grad(one, x, first_logit)  # eot=1: the one pass, with the sign +1
    assert one.calls == 1 and torch.equal(g1, (one.a + one.b)[0].view(1, 1, 4, 4).expand_as(x))


class NoisyScale(torch.nn.Module):
    """Logits ``(1 + sigma * e) W x`` with ``e ~ N(0, 1)`` drawn per call: the input gradient is random."""

    def __init__(self, sigma=0.5):
        super().__init__()
        self.register_buffer("w", torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
        self.sigma = sigma

    def forward(self, x):
        return (1 + self.sigma * torch.randn(())) * (x.flatten(1) @ self.w.T)


def test_eot_divides_the_gradient_variance_by_the_passes():
    from scipy.stats import f

    net, x, draws, k = NoisyScale(), torch.rand(1, 1, 4, 4), 200, 8
    torch.manual_seed(0)

    def noise(eot):  # grad / W[0] - 1 = sigma * mean of eot standard normals: variance sigma^2 / eot
        return torch.stack([input_grad(net, x, lambda z: z[:, 0], eot)[1].flatten()[0] for _ in range(draws)])

    w0 = float(net.w[0, 0])
    v1, vk = float((noise(1) / w0).var()), float((noise(k) / w0).var())
    # (v1 / sigma^2) / (vk * k / sigma^2) is F(draws - 1, draws - 1): a two-sided 1e-6 interval around k
    low, high = f.ppf(1e-6, draws - 1, draws - 1), f.ppf(1 - 1e-6, draws - 1, draws - 1)
    assert low <= v1 / (vk * k) <= high
    assert v1 / vk > 2  # low * k > 2: the variance did fall


def test_eot_is_a_parameter_of_the_gradient_attacks_only():
    for name in ("pgd", "apgd_ce", "apgd_t", "fgsm"):
        assert ATTACKS.get(name)(ThreatModel()).params.eot == 1
        with pytest.raises(harden.PolicyError, match="eot"):
            ATTACKS.get(name)(ThreatModel(), {"eot": 0})
    with pytest.raises(harden.PolicyError, match="eot"):
        ATTACKS.get("square")(ThreatModel(), {"eot": 2})


def test_attacks_freeze_the_parameters_and_restore_each_flag_also_on_error():
    from harden.testing import TinyCNN

    model = TinyCNN(num_classes=3)
    list(model.parameters())[-1].requires_grad_(False)  # a parameter the user froze stays frozen
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner, fail=False):
            super().__init__()
            self.inner, self.fail = inner, fail

        def forward(self, x):
            seen.append([p.requires_grad for p in self.inner.parameters()])
            if self.fail:
                raise RuntimeError("boom")
            return self.inner(x)

    x, y = synthetic_tensors(4, num_classes=3)
    flags = [p.requires_grad for p in model.parameters()]
    ATTACKS.get("pgd")(ThreatModel(eps=0.1), {"steps": 2})(Spy(model), x, y)
    assert seen and all(not any(s) for s in seen)  # frozen during the attack
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(RuntimeError, match="boom"):
        ATTACKS.get("pgd")(ThreatModel(eps=0.1), {"steps": 2})(Spy(model, fail=True), x, y)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_tick_clamps_and_is_silent_without_a_listener():
    pgd = ATTACKS.get("pgd")(ThreatModel(eps=0.1))
    pgd.tick(0.5)  # no listener: nothing happens
    heard = []
    pgd.on_progress = heard.append
    for done in (-1, 0.5, 2):
        pgd.tick(done)
    assert heard == [0.0, 0.5, 1.0]


def test_channels_last_weights_puts_the_very_same_tensors_back():
    from harden.attacks.base import channels_last_weights
    from harden.testing import TinyCNN, TinyMLP

    model = TinyCNN(num_classes=3)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    x = torch.rand(2, 1, 8, 8)
    restore = channels_last_weights(model, x)
    assert restore is not None
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # the 16 -> 32 channel convolution changed its layout
    restore()
    for name, p in model.named_parameters():  # the very same storage, the same values
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]) and p.is_contiguous()
    assert channels_last_weights(TinyMLP(num_classes=3), x) is None  # no 4-D weight: nothing to change


def test_channels_last_weights_puts_back_what_it_swapped_when_a_copy_fails(monkeypatch):
    from harden.attacks import base
    from harden.testing import TinyCNN

    model = TinyCNN(num_classes=3)
    before = [(p.data_ptr(), p.stride()) for p in model.parameters()]
    calls, real = [], torch.empty_like

    def failing(*args, **kwargs):  # the second weight's copy runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(base.torch, "empty_like", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        base.channels_last_weights(model, torch.rand(2, 1, 8, 8))
    assert len(calls) == 2 and [(p.data_ptr(), p.stride()) for p in model.parameters()] == before


class _ViewNet(torch.nn.Module):
    """A CNN that flattens with .view(): fails on a channels_last activation, so Square must fall back."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).view(x.shape[0], -1))


def test_square_falls_back_to_the_models_own_layout_and_restores_it():
    torch.manual_seed(0)
    model = _ViewNet().eval()
    x, y = synthetic_tensors(6, num_classes=3)
    from harden.attacks.base import channels_last_weights

    restore = channels_last_weights(model, x)
    with pytest.raises(RuntimeError), torch.no_grad():  # the case the fallback is for
        model(x)
    restore()
    ptr = model.conv2.weight.data_ptr()
    adv = ATTACKS.get("square")(ThreatModel(eps=0.1), {"n_queries": 20})(model, x, y)
    # float32 pixels in [0, 1]: x + 0.1 rounds once (2^-24 relative), so |adv - x| <= 0.1 + 2^-23
    assert float((adv - x).abs().max()) <= 0.1 + 2**-23
    assert model.conv2.weight.data_ptr() == ptr and model.conv2.weight.is_contiguous()
    with torch.no_grad():
        assert model(adv).shape == (6, 3)  # the model works in its own layout afterwards
