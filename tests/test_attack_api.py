import pytest
import torch

from harden.attack_api import attack
from harden.attacks import ATTACKS
from harden.errors import DataError, InputError, ModelError, PolicyError, ThreatModelError, UnknownNameError
from harden.models import Normalized
from harden.testing import TinyCNN, synthetic_tensors

#: x + delta and the difference with x each round to half an ulp of a value <= 1 (2**-24): the
#: measured distance may exceed eps by at most 2**-23
ROUNDING = 2.0**-23


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd_ce", "square"])
def test_the_attack_stays_in_the_ball_and_beats_random_noise(trained_xy, name):
    model, x, y = trained_xy
    eps = 0.1
    x_adv = attack(name, model, x, y, eps=eps, params=ATTACKS.get(name).example_params)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + ROUNDING
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    gen = torch.Generator().manual_seed(3)
    noise = (x + eps * torch.randint(0, 2, x.shape, generator=gen).mul(2).sub(1)).clamp(0, 1)  # random corners
    clean, noisy, robust = _accuracy(model, x, y), _accuracy(model, noise, y), _accuracy(model, x_adv, y)
    assert robust < min(clean, noisy)  # the attack does what random corners of the ball do not


def test_l2_ball_and_seeding(trained_xy):
    model, x, y = trained_xy
    rng = torch.get_rng_state()
    a = attack("pgd", model, x, y, eps=0.5, norm="l2", params={"steps": 3}, seed=7)
    b = attack("pgd", model, x, y, eps=0.5, norm="l2", params={"steps": 3}, seed=7)
    c = attack("pgd", model, x, y, eps=0.5, norm="l2", params={"steps": 3}, seed=8)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left as it was
    assert torch.equal(a, b) and not torch.equal(a, c)  # random starts from the seed
    # the projection scales delta by eps / ||delta|| (a few float32 roundings, relative 2**-24 each), then
    # x + delta and its difference with x round each of the d = 64 values by up to 2**-24: sqrt(d) * 2**-24
    bound = 0.5 * (1 + 4 * 2.0**-24) + x[0].numel() ** 0.5 * 2.0**-24
    assert float((a - x).flatten(1).norm(dim=1).max()) <= bound


def test_the_model_modes_are_restored():
    model = TinyCNN(num_classes=3).train()
    model.features[1].eval()
    before = _modes(model)
    x, y = synthetic_tensors(8, seed=1)
    attack("fgsm", model, x, y, eps=0.1)
    assert _modes(model) == before


def test_a_normalized_model_is_taken_as_it_is():
    inner = TinyCNN(num_classes=3).eval()
    net = Normalized(inner, mean=(0.5,), std=(0.25,))
    x, y = synthetic_tensors(8, seed=1)
    x_adv = attack("pgd", net, x, y, eps=0.05, params={"steps": 2})
    assert float((x_adv - x).abs().max()) <= 0.05 + ROUNDING


def test_transfer_takes_a_surrogate(trained_xy):
    model, x, y = trained_xy
    with pytest.raises(DataError, match="surrogate"):
        attack("transfer", model, x, y, eps=0.1, params={"steps": 2})
    x_adv = attack("transfer", model, x, y, eps=0.1, params={"steps": 2}, surrogate=model)
    assert float((x_adv - x).abs().max()) <= 0.1 + ROUNDING


def test_bad_names_params_and_inputs_give_one_line_errors():
    model = TinyCNN(num_classes=3)
    x, y = synthetic_tensors(8, seed=1)
    cases = [
        (UnknownNameError, "did you mean 'pgd'", lambda: attack("pgdd", model, x, y, eps=0.1)),
        (PolicyError, "expected an attack name", lambda: attack(3, model, x, y, eps=0.1)),  # type: ignore[arg-type]
        (PolicyError, "stepz", lambda: attack("pgd", model, x, y, eps=0.1, params={"stepz": 3})),
        (PolicyError, "steps", lambda: attack("pgd", model, x, y, eps=0.1, params={"steps": 0})),
        (PolicyError, "mapping", lambda: attack("pgd", model, x, y, eps=0.1, params=[("steps", 3)])),  # type: ignore[arg-type]
        (ThreatModelError, "eps", lambda: attack("pgd", model, x, y, eps=-1.0)),
        (ThreatModelError, "norm", lambda: attack("pgd", model, x, y, eps=0.1, norm="l1")),
        (InputError, "[0, 1]", lambda: attack("pgd", model, x * 255, y, eps=0.1)),
        (InputError, "float32", lambda: attack("pgd", model, x.double(), y, eps=0.1)),
        (InputError, "NCHW", lambda: attack("pgd", model, x[0], y, eps=0.1)),
        (InputError, "8 labels", lambda: attack("pgd", model, x, y[:-1], eps=0.1)),
        (InputError, "integer", lambda: attack("pgd", model, x, y.float(), eps=0.1)),
        (InputError, "labels in [0, 2]", lambda: attack("pgd", model, x, torch.full_like(y, 5), eps=0.1)),
        (InputError, "torch tensor", lambda: attack("pgd", model, x.numpy(), y, eps=0.1)),  # type: ignore[arg-type]
        (ModelError, "nn.Module", lambda: attack("pgd", "model", x, y, eps=0.1)),  # type: ignore[arg-type]
    ]
    for error, words, call in cases:
        with pytest.raises(error) as exc:
            call()
        text = str(exc.value)
        assert words in text and "\n" not in text, (error, words, text)
    assert isinstance(InputError("x"), ThreatModelError)  # one except catches either family
