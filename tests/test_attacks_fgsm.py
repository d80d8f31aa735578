"""harden.attacks.fgsm: one signed-gradient step of the full eps, deterministic."""

import torch

from harden.attacks import ATTACKS
from harden.attacks.fgsm import FGSM
from harden.policy import ThreatModel


def test_registered_with_only_the_eot_parameter():
    assert ATTACKS.get("fgsm") is FGSM
    assert FGSM.white_box and FGSM.bounded and not FGSM.changes_label
    assert FGSM(ThreatModel()).params.model_dump() == {"eot": 1}


def test_fgsm_is_deterministic_and_one_step(trained_xy):
    model, x, y = trained_xy
    threat = ThreatModel(eps=0.05)
    adv = ATTACKS.get("fgsm")(threat)(model, x, y)
    moved = (adv - x).abs()
    inside = (x > 0.05) & (x < 0.95)
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], 0.05), atol=1e-6)  # sign step, full eps
    assert torch.equal(adv, ATTACKS.get("fgsm")(threat)(model, x, y))


def test_fgsm_l2_step_has_norm_eps_inside_the_box(trained_xy):
    model, x, y = trained_xy
    x, y = torch.full((8, 1, 8, 8), 0.5), y[:8]  # no pixel moves more than eps = 0.5: nothing is clipped
    adv = ATTACKS.get("fgsm")(ThreatModel(norm="l2", eps=0.5))(model, x, y)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.5), atol=1e-5)


def test_eot_on_a_deterministic_model_averages_equal_passes_to_the_same_step(trained_xy):
    model, x, y = trained_xy
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        one = FGSM(ThreatModel(eps=0.05))(model, x, y)
        n_one = len(calls)
        two = FGSM(ThreatModel(eps=0.05), {"eot": 2})(model, x, y)
    finally:
        hook.remove()
    assert torch.equal(one, two)  # (g + g) / 2 == g exactly
    assert (n_one, len(calls) - n_one) == (1, 2)
