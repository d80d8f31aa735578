"""harden.check_context: the checks' shared clean logits and PGD runs (cached, continued, warm-started)."""

import torch

from harden.check_context import CheckContext
from harden.policy import ThreatModel
from harden.testing import synthetic_tensors


def _ctx(model, **kw):
    x, y = synthetic_tensors(96, seed=2)
    return CheckContext(model, x, y, ThreatModel(eps=0.1), num_classes=3, steps=10, **kw)


def test_clean_logits_are_computed_once_in_eval_mode(trained):
    ctx = _ctx(trained)
    first = ctx.logits()
    assert ctx.logits() is first and trained.training is False
    with torch.no_grad():
        assert torch.equal(first, trained(ctx.x))
    assert ctx.clean_accuracy() == float((first.argmax(1) == ctx.y).float().mean())


def test_each_attack_run_is_honest_warm_and_kept(trained):
    ctx = _ctx(trained)
    small, large = ctx.attack(0.05), ctx.attack(0.1)
    assert ctx.attack(0.1) is large  # computed once, shared by whoever asks
    for state, eps in ((small, 0.05), (large, 0.1)):
        # float32 pixels in [0, 1]: x_adv - x is off by at most one rounding of a number <= 1 (2**-24 < 1e-6)
        assert float((state.x_adv - ctx.x).abs().amax()) <= eps + 1e-6
        assert float(state.x_adv.min()) >= 0.0 and float(state.x_adv.max()) <= 1.0
        with torch.no_grad():
            assert torch.equal(state.right, trained(state.x_adv).argmax(1) == ctx.y)  # a fresh forward pass
        assert state.accuracy == int(state.right.sum()) / len(ctx.y)
    fooled = ~small.right
    assert bool(fooled.any()) and bool(large.right.any())  # the comparisons below test something
    assert torch.equal(large.x_adv[fooled], small.x_adv[fooled])  # kept, not attacked again
    assert not bool((large.right & fooled).any())  # fooled at 0.05, fooled at 0.1: the curve never rises
    assert large.accuracy <= small.accuracy <= ctx.clean_accuracy()


def test_extend_continues_only_the_examples_still_right_and_never_undoes_a_break(trained):
    ctx = _ctx(trained, seed=3)
    base = ctx.attack(0.1)
    more = ctx.extend(base)
    again = ctx.extend(base, restart=1)
    for state in (more, again):
        assert float((state.x_adv - ctx.x).abs().amax()) <= 0.1 + 1e-6  # as above
        with torch.no_grad():
            assert torch.equal(state.right, trained(state.x_adv).argmax(1) == ctx.y)
        fooled = ~base.right
        assert torch.equal(state.x_adv[fooled], base.x_adv[fooled])  # broken examples are kept as they were
        assert state.accuracy <= base.accuracy


def test_extend_refuses_a_radius_below_the_base_run(trained):
    import pytest

    ctx = _ctx(trained)
    with pytest.raises(ValueError, match="eps >="):
        ctx.extend(ctx.attack(0.1), eps=0.05)
