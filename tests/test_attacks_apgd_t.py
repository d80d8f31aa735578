"""APGD-T: the targeted DLR loss, the targets, and screening (short runs, then full runs where they matter)."""

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from helpers_attacks import assert_not_weaker
from torch import nn

from harden.attacks import ATTACKS
from harden.attacks.apgd_t import APGDT, targeted_dlr_loss
from harden.errors import PolicyError
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors


def test_targeted_dlr_loss():
    torch.manual_seed(0)
    z = torch.randn(64, 10)
    y, t = torch.randint(0, 10, (64,)), torch.randint(0, 10, (64,))
    s = z.sort(dim=1, descending=True).values
    rows = torch.arange(64)
    expected = -(z[rows, y] - z[rows, t]) / (s[:, 0] - (s[:, 2] + s[:, 3]) / 2 + 1e-12)
    torch.testing.assert_close(targeted_dlr_loss(z, y, t), expected)
    # fewer than 4 classes: the targeted margin z_t - z_y
    for c in (2, 3):
        zc = z[:, :c].clone().requires_grad_(True)
        yc, tc = y % c, (y + 1) % c
        loss_c = targeted_dlr_loss(zc, yc, tc)
        torch.testing.assert_close(loss_c, zc[rows, tc] - zc[rows, yc])
        (g,) = torch.autograd.grad(loss_c.sum(), zc)
        assert (g.abs().sum(1) > 0).all()


def test_apgd_t_targets_are_the_runner_up_classes_capped():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 4.0, 6.0]])
    targets = APGDT(ThreatModel(), {"n_target_classes": 9})._targets(logits)
    assert len(targets) == 2  # capped at num_classes - 1
    assert targets[0].tolist() == [2, 0] and targets[1].tolist() == [0, 1]
    assert len(APGDT(ThreatModel(), {"n_target_classes": 1})._targets(logits)) == 1


def test_screening_params_are_validated():
    assert ATTACKS.get("apgd_t") is APGDT
    p = APGDT(ThreatModel()).params
    assert (p.screen_steps, p.full_targets) == (None, 1)  # the class default is the reference
    for bad in ({"screen_steps": 0}, {"full_targets": 0}, {"screen_steps": "ten"}):
        with pytest.raises(PolicyError):
            APGDT(ThreatModel(), bad)


def _trained_cnn():
    x, y = synthetic_tensors(256, num_classes=5, seed=1, noise=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            for i in range(0, len(x), 64):
                opt.zero_grad()
                F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
    return model.eval()


def _attack(params, model, x, y, seed=0):
    torch.manual_seed(seed)
    return APGDT(ThreatModel(eps=0.05), params)(model, x, y)


def test_screen_steps_unset_or_not_shorter_is_the_reference_bit_for_bit():
    model = _trained_cnn()
    x, y = synthetic_tensors(48, num_classes=5, seed=2, noise=0.3)
    ref = _attack({"steps": 12, "n_target_classes": 3}, model, x, y)
    for screen in (12, 30):
        same = _attack({"steps": 12, "n_target_classes": 3, "screen_steps": screen}, model, x, y)
        assert torch.equal(ref, same)


class _Recorder(APGDT):
    """APGD-T that records every run: (steps, targets, best losses, fooled)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = []

    def _run(self, model, x, y, target, steps):
        adv, fooled, loss = super()._run(model, x, y, target, steps)
        self.runs.append((steps, y.clone(), target.clone(), loss.clone(), fooled.clone()))
        return adv, fooled, loss


class _Unbreakable(nn.Module):
    """Logits that favour the label by far more than any eps-ball can change: nothing is ever fooled."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.lin = nn.Linear(64, num_classes)

    def forward(self, x):
        z = self.lin(x.flatten(1))
        return z + 1000.0 * F.one_hot(self.label, z.shape[1]).to(z.dtype)


def test_screening_gives_every_target_a_short_run_and_the_best_ranked_one_the_full_runs():
    torch.manual_seed(0)
    model = _Unbreakable()
    x, _ = synthetic_tensors(12, num_classes=5, seed=3)
    y = torch.arange(12) % 5
    model.label = y
    attack = _Recorder(ThreatModel(eps=0.05), {"steps": 9, "n_target_classes": 4, "screen_steps": 3, "restarts": 2})
    torch.manual_seed(0)
    attack(model, x, y)
    steps = [r[0] for r in attack.runs]
    assert steps == [3, 3, 3, 3, 9, 9]  # four short runs, then full_targets (1) x restarts (2) full ones
    assert all(r[1].numel() == 12 for r in attack.runs)  # nothing fooled: every run sees every example
    losses = torch.stack([r[3] for r in attack.runs[:4]], dim=1)
    targets = torch.stack([r[2] for r in attack.runs[:4]], dim=1)
    best = targets.gather(1, losses.argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.equal(attack.runs[4][2], best) and torch.equal(attack.runs[5][2], best)
    assert len({tuple(r[2].tolist()) for r in attack.runs[:4]}) == 4  # four distinct target columns


def test_screening_with_full_targets_runs_the_two_best_ranked_targets():
    model = _Unbreakable()
    x, _ = synthetic_tensors(10, num_classes=5, seed=4)
    y = torch.arange(10) % 5
    model.label = y
    attack = _Recorder(ThreatModel(eps=0.05), {"steps": 6, "n_target_classes": 4, "screen_steps": 2, "full_targets": 2})
    torch.manual_seed(0)
    attack(model, x, y)
    assert [r[0] for r in attack.runs] == [2, 2, 2, 2, 6, 6]
    losses = torch.stack([r[3] for r in attack.runs[:4]], dim=1)
    targets = torch.stack([r[2] for r in attack.runs[:4]], dim=1)
    order = targets.gather(1, losses.argsort(dim=1, descending=True, stable=True))
    assert torch.equal(attack.runs[4][2], order[:, 0]) and torch.equal(attack.runs[5][2], order[:, 1])


def test_screening_stops_attacking_an_example_once_fooled():
    model = _trained_cnn()
    x, y = synthetic_tensors(64, num_classes=5, seed=2, noise=0.3)
    attack = _Recorder(ThreatModel(eps=0.05), {"steps": 10, "n_target_classes": 4, "screen_steps": 3})
    torch.manual_seed(0)
    adv = attack(model, x, y)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    sizes = [r[1].numel() for r in attack.runs]
    assert sizes == sorted(sizes, reverse=True)  # later runs see only the examples still unfooled
    assert len(sizes) == 5 and sizes[-1] < sizes[0] == 64 - int((model(x).argmax(1) != y).sum())
    # whatever the last run attacked and did not fool is exactly what stays right
    assert 64 - int(fooled.sum()) == sizes[-1] - int(attack.runs[-1][4].sum())


def test_progress_ticks_rise_to_one():
    model = _trained_cnn()
    x, y = synthetic_tensors(16, num_classes=5, seed=2, noise=0.3)
    for params in ({"steps": 4, "n_target_classes": 3}, {"steps": 8, "n_target_classes": 3, "screen_steps": 2}):
        attack = APGDT(ThreatModel(eps=0.01), params)
        ticks = []
        attack.on_progress = ticks.append
        torch.manual_seed(0)
        attack(model, x, y)
        assert ticks and ticks == sorted(ticks) and all(0 < t <= 1 for t in ticks)
        assert ticks[-1] == 1.0  # nothing was fooled at this eps: every run ran


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_screened_apgd_t_not_weaker_than_torchattacks_default(digits_cnn, norm):
    """harden's standard setting (10-step screen, 100-step full run) vs torchattacks' AutoAttack APGD-T (10 steps)."""
    model, x, y = digits_cnn
    eps = 0.1 if norm == "linf" else 0.5
    torch.manual_seed(0)
    ours = APGDT(ThreatModel(norm=norm, eps=eps), {"steps": 100, "n_target_classes": 9, "screen_steps": 10})(
        model, x, y
    )
    theirs = torchattacks.APGDT(
        model, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=10, n_restarts=1, n_classes=10, seed=0
    )(x, y)
    model.zero_grad(set_to_none=True)  # torchattacks may leave gradients on the shared model
    assert_not_weaker(model, ours, theirs, y)
    with torch.no_grad():
        assert (model(ours).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


def test_screening_with_one_class_has_no_target_and_returns_the_input():
    x, y = torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    out = APGDT(ThreatModel(eps=0.1), {"steps": 4, "screen_steps": 2})(model, x, y)
    assert torch.equal(out, x)
