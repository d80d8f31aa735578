"""harden.attacks.base: the projection onto the threat model, parameter and threat validation, default scoring."""

import pytest
import torch

import harden
from harden.attacks import ATTACKS, lp_norm, project
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
