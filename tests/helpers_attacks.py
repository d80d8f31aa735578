"""Helpers shared by the attack tests: seeded training of tiny models, accuracy, and the checks every
box-and-ball attack test repeats (inside the ball and the box, inputs on the box edge, seeded)."""

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.base import lp_norm, save_modes
from harden.policy import ThreatModel
from harden.testing import TinyCNN


def fit(model, x, y, epochs, lr, batch=64, seed=0):
    """Adam on ``(x, y)`` for ``epochs`` seeded epochs (the global RNG untouched); the model in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and immune to a busy machine
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(len(x))
                for i in range(0, len(x), batch):
                    idx = perm[i : i + batch]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    return model.eval()



@torch.no_grad()
def acc(model, x, y):
    """Accuracy of ``model`` on ``(x, y)``."""
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def assert_not_weaker(model, adv, ref_adv, y, alpha=1e-3):
    """Exact one-sided McNemar test: fail only if the attack behind ``adv`` is weaker than the one behind
    ``ref_adv`` at significance ``alpha``.

    Two different (chaotic) attacks on the same examples: only the discordant examples carry
    information. Under "equally strong" each of them is won by either attack with probability 1/2,
    so the count the reference wins is Binomial(discordant, 1/2); a fixed slack of a few examples
    is no bound at all.
    """
    from scipy.stats import binomtest

    right, ref_right = model(adv).argmax(1) == y, model(ref_adv).argmax(1) == y
    weaker = int((right & ~ref_right).sum())  # robust against this attack only
    stronger = int((ref_right & ~right).sum())  # robust against the reference only
    if weaker > stronger:
        pvalue = binomtest(weaker, weaker + stronger, 0.5, alternative="greater").pvalue
        assert pvalue >= alpha, f"weaker on {weaker} examples, stronger on {stronger}: p = {pvalue:.2g}"


class Flaky(nn.Module):
    """TinyCNN that raises on its ``fail_at``-th forward call."""

    def __init__(self, fail_at):
        super().__init__()
        self.net = TinyCNN(num_classes=3)
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom inside forward")
        return self.net(x)


def check_inside_ball_and_box(make, threat, model, x, y):
    """At 3x eps: modes restored, x untouched, shape/dtype kept, inside [0, 1] and the ball, moved, no grads."""
    x, y = x[:48], y[:48]
    x0 = x.clone()
    model.zero_grad(set_to_none=True)  # the fixture is shared: start from no gradients (torchattacks leaves some)
    model.train()
    model.features[1].eval()
    modes = save_modes(model)
    big = ThreatModel(norm=threat.norm, eps=threat.eps * 3)  # large enough to move most examples
    adv = make(big)(model, x, y)
    assert save_modes(model) == modes
    model.eval()
    assert torch.equal(x, x0)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # d = 64 pixels. l2: each norm's relative error <= d*u = 64 * 6e-8 = 3.8e-6 (< 1e-5), and
    # fl(x + delta) adds <= u per pixel, sqrt(d)*u = 4.8e-7 in l2 (< 1e-6); linf: one rounding <= u
    assert x[0].numel() == 64
    assert float(lp_norm(adv - x, threat.norm).max()) <= big.eps * (1 + 1e-5) + 1e-6
    assert not torch.equal(adv, x)
    assert all(p.grad is None for p in model.parameters())


def check_box_edge(make, model, threats):
    """Inputs at 0 and 1 stay inside the box and the ball."""
    x = torch.zeros(4, 1, 8, 8)
    x[2:] = 1.0
    for threat in threats:
        adv = make(threat)(model, x, torch.tensor([0, 1, 2, 0]))
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float(lp_norm(adv - x, threat.norm).max()) <= threat.eps * (1 + 1e-5) + 1e-6  # as above, d = 64


def check_same_seed(make, threat, model, x, y):
    """The same torch seed gives the same result (two restarts)."""
    attack = make(threat, restarts=2)
    torch.manual_seed(3)
    a = attack(model, x, y)
    torch.manual_seed(3)
    b = attack(model, x, y)
    assert torch.equal(a, b)
