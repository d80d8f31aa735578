"""harden.attacks.invariance: rotations and shifts, kept only where they fool the model."""

import torch

from harden.attacks import ATTACKS
from harden.attacks.invariance import rotate_shift
from harden.policy import ThreatModel
from harden.testing import synthetic_tensors


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_rotate_shift_identity_and_shift():
    x = torch.rand(2, 1, 9, 9)
    assert torch.allclose(rotate_shift(x, 0.0, 0.0, 0.0), x, atol=1e-5)
    shifted = rotate_shift(x, 0.0, 2.0, 0.0)
    assert torch.allclose(shifted[..., 2:], x[..., :-2], atol=1e-5)
    assert float(shifted[..., :2].abs().max()) == 0.0


def test_invariance_finds_the_transform_and_reports_only_fooled(trained):
    x, y = synthetic_tensors(64, seed=2)
    atk = ATTACKS.get("invariance")(ThreatModel(eps=0.1), {"angles": 5, "shifts": 3})
    assert len(atk.grid()) == 45 and atk.grid()[0] == (0.0, 0.0, 0.0)
    out = atk(trained, x, y)
    changed = (out - x).flatten(1).abs().amax(1) > 0
    with torch.no_grad():
        fooled = trained(out).argmax(1) != y
    assert bool((fooled | ~changed).all())  # anything changed was changed because it fools
    assert _acc(trained, out, y) < _acc(trained, x, y)
