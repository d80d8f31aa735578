"""APGD-CE and APGD-T: threat model, strength against PGD and torchattacks, determinism."""

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from helpers_attacks import assert_not_weaker
from torch import nn

import harden
import harden.attacks.apgd  # registers apgd_ce and apgd_t
from harden.attacks import ATTACKS, lp_norm
from harden.attacks.apgd import APGDCE, apgd_checkpoints
from harden.attacks.apgd_t import APGDT
from harden.attacks.pgd import PGD
from harden.policy import ThreatModel
from harden.testing import TinyCNN, TinyMLP, synthetic_tensors

N_TEST = 240  # strength comparisons use an exact McNemar test on these examples (helpers_attacks)
THREATS = {"linf": ThreatModel(norm="linf", eps=0.05), "l2": ThreatModel(norm="l2", eps=0.5)}
ATTACK_CLASSES = {"apgd_ce": APGDCE, "apgd_t": APGDT}


def _train(model, num_classes, epochs=3):
    x, y = synthetic_tensors(512, num_classes=num_classes, seed=1, noise=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """Seeded TinyCNN and MLP trained a few steps on 5-class synthetic data, and a 3-class CNN."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return {
            "cnn": _train(TinyCNN(num_classes=5), 5),
            "mlp": _train(TinyMLP(num_classes=5, hidden=64), 5),
            "cnn3": _train(TinyCNN(num_classes=3), 3),
            "mlp2": _train(TinyMLP(num_classes=2, hidden=64), 2),
        }


def data(num_classes=5, n=N_TEST):
    return synthetic_tensors(n, num_classes=num_classes, seed=2, noise=0.3)


@torch.no_grad()
def acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def run(name, threat, model, x, y, seed=0, **params):
    torch.manual_seed(seed)
    return ATTACKS.get(name)(threat, params)(model, x, y)


def torchattacks_adv(name, threat, model, x, y, steps, num_classes):
    norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
    if name == "apgd_ce":
        attack = torchattacks.APGD(model, norm=norm, eps=threat.eps, steps=steps, n_restarts=1, seed=0, loss="ce")
    else:
        attack = torchattacks.APGDT(
            model, norm=norm, eps=threat.eps, steps=steps, n_restarts=1, seed=0, n_classes=num_classes
        )
    adv = attack(x, y)
    model.zero_grad(set_to_none=True)  # torchattacks may leave gradients on the shared model
    return adv


# --------------------------------------------------------------------------- registry, params, pieces


def test_registered_with_the_reference_defaults():
    assert ATTACKS.get("apgd_ce") is APGDCE
    assert ATTACKS.get("apgd_t") is APGDT
    ce, t = APGDCE(ThreatModel()).params, APGDT(ThreatModel()).params
    assert (ce.steps, ce.restarts, ce.rho) == (100, 1, 0.75)
    assert (t.steps, t.restarts, t.rho, t.n_target_classes) == (100, 1, 0.75, 9)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("apgd_ce", {"steps": 0}),
        ("apgd_ce", {"rho": 0}),
        ("apgd_ce", {"rho": 1.5}),
        ("apgd_ce", {"restarts": 0}),
        ("apgd_ce", {"n_target_classes": 3}),
        ("apgd_t", {"n_target_classes": 0}),
        ("apgd_t", {"loss": "ce"}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(harden.PolicyError):
        ATTACKS.get(name)(ThreatModel(), params)


def test_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == []
    for steps in range(1, 400):
        w = apgd_checkpoints(steps)
        assert all(0 <= a < b < steps for a, b in zip([0, *w], w, strict=False))


# --------------------------------------------------------------------------- threat model


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t"])
@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_inside_ball_and_box_and_clean_errors_untouched(models, model_name, name, norm):
    model, threat = models[model_name], THREATS[norm]
    if (model_name, norm) == ("mlp", "linf"):
        # at eps 0.05 only a few of 64 examples fall (2 here): too few to be sure of one; 3x eps
        threat = ThreatModel(norm="linf", eps=3 * threat.eps)
    x, y = data(n=64)
    params = {"steps": 10, **({"n_target_classes": 2} if name == "apgd_t" else {})}
    adv = run(name, threat, model, x, y, **params)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # d = 64. l2: each norm's relative error <= d*u = 64 * 6e-8 = 3.8e-6 (< 1e-5); fl(x + delta) adds
    # <= u per pixel, sqrt(d)*u = 4.8e-7 in l2 (< 1e-6); linf: one rounding <= u
    assert float(lp_norm(adv - x, norm).max()) <= threat.eps * (1 + 1e-5) + 1e-6
    with torch.no_grad():
        wrong_clean = model(x).argmax(1) != y
    assert torch.equal(adv[wrong_clean], x[wrong_clean])
    assert acc(model, adv, y) < acc(model, x, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t"])
def test_same_result_under_the_same_seed(models, name, norm):
    x, y = data(n=64)
    params = {"steps": 20, **({"n_target_classes": 2} if name == "apgd_t" else {})}
    a = run(name, THREATS[norm], models["cnn"], x, y, seed=7, **params)
    b = run(name, THREATS[norm], models["cnn"], x, y, seed=7, **params)
    assert torch.equal(a, b)


def test_restarts_attack_only_the_examples_not_yet_fooled(models):
    batch_sizes = []

    class Spy(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            batch_sizes.append(x.shape[0])
            return self.net(x)

    mlp, threat = models["mlp"], ThreatModel(norm="linf", eps=0.03)
    x, y = data()
    steps = 10
    adv = run("apgd_ce", threat, Spy(mlp), x, y, restarts=3, steps=steps)
    clean_correct = int((mlp(x).argmax(1) == y).sum())
    assert batch_sizes[0] == N_TEST  # the clean pass
    assert batch_sizes[1] == clean_correct  # the first run attacks the clean-correct examples only
    assert batch_sizes[1:] == sorted(batch_sizes[1:], reverse=True)  # and never grows
    robust = int((mlp(adv).argmax(1) == y).sum())
    assert batch_sizes[-1] >= robust  # the last run still attacked every robust example
    # the same seed gives the same first run, so more restarts never help the model
    one = run("apgd_ce", threat, mlp, x, y, restarts=1, steps=steps)
    assert robust <= int((mlp(one).argmax(1) == y).sum())


# --------------------------------------------------------------------------- strength


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_at_least_as_strong_as_pgd10(models, norm):
    model, threat = models["mlp"], THREATS[norm]
    x, y = data()
    pgd = ATTACKS.get("pgd")(threat, {"steps": 10})
    torch.manual_seed(0)
    pgd_adv = pgd(model, x, y)
    apgd_adv = run("apgd_ce", threat, model, x, y)
    assert_not_weaker(model, apgd_adv, pgd_adv, y)
    assert acc(model, apgd_adv, y) < acc(model, x, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_t_lowers_accuracy_with_three_and_two_classes(models, norm):
    # these models are more robust than the 5-class ones: a larger ball
    threat = {"linf": ThreatModel(norm="linf", eps=0.15), "l2": ThreatModel(norm="l2", eps=1.0)}[norm]
    for model, num_classes in [(models["cnn3"], 3), (models["mlp2"], 2)]:
        x, y = data(num_classes=num_classes, n=96)
        adv = run("apgd_t", threat, model, x, y, steps=20)
        assert float(lp_norm(adv - x, norm).max()) <= threat.eps * (1 + 1e-5) + 1e-6  # as above, d = 64
        assert acc(model, adv, y) < acc(model, x, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t"])
def test_at_least_as_strong_as_torchattacks_mlp(models, name, norm):
    model, threat = models["mlp"], THREATS[norm]
    x, y = data()
    ours = run(name, threat, model, x, y, steps=100)
    assert_not_weaker(model, ours, torchattacks_adv(name, threat, model, x, y, steps=100, num_classes=5), y)
    assert acc(model, ours, y) < acc(model, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t"])
def test_at_least_as_strong_as_torchattacks_and_pgd10_cnn(models, name, norm):
    model, threat = models["cnn"], THREATS[norm]
    x, y = data()
    ours = run(name, threat, model, x, y, steps=100)
    assert_not_weaker(model, ours, torchattacks_adv(name, threat, model, x, y, steps=100, num_classes=5), y)
    torch.manual_seed(0)
    assert_not_weaker(model, ours, PGD(threat, {"steps": 10})(model, x, y), y)
    assert acc(model, ours, y) < acc(model, x, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t"])
def test_eot_on_a_deterministic_model_doubles_every_pass_and_changes_nothing(models, name, norm):
    x, y = data(n=32)
    params = {"steps": 10, **({"n_target_classes": 2} if name == "apgd_t" else {})}
    model, counts, advs = models["cnn"], [], []
    for eot in (1, 2):
        calls = []
        hook = model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            advs.append(run(name, THREATS[norm], model, x, y, seed=7, eot=eot, **params))
        finally:
            hook.remove()
        counts.append(len(calls))
    # equal passes average to themselves exactly ((v + v) / 2 == v), so the runs take the same path
    assert torch.equal(advs[0], advs[1])
    assert counts[1] == 2 * counts[0] > 0  # every forward pass (clean logits, each step) is taken eot times
