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
        assert float(lp_norm(adv - x, threat.norm).max()) <= threat.eps * (1 + 1e-5) + 1e-6


def check_same_seed(make, threat, model, x, y):
    """The same torch seed gives the same result (two restarts)."""
    attack = make(threat, restarts=2)
    torch.manual_seed(3)
    a = attack(model, x, y)
    torch.manual_seed(3)
    b = attack(model, x, y)
    assert torch.equal(a, b)
