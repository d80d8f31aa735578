"""harden.check_context: the checks' shared clean logits and PGD runs (cached, continued, warm-started)."""

import itertools

import torch

from harden.check_context import CheckContext
from harden.policy import ThreatModel
from harden.testing import RowCounter, synthetic_tensors


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


def _with_suite(model, **kw):
    from harden.attacks import ATTACKS

    x, y = synthetic_tensors(96, seed=2)
    adv = ATTACKS.get("pgd")(ThreatModel(eps=0.1), {"steps": 5})(model, x, y)  # the suite's points at eps 0.1
    net = RowCounter(model)
    ctx = CheckContext(net, x, y, ThreatModel(eps=0.1), num_classes=3, steps=10, suite_adv=adv, seed=1, **kw)
    ctx.logits()
    net.rows = 0
    return net, ctx, adv


def test_the_suites_outcome_is_the_run_at_the_threats_eps_and_is_not_attacked_again(trained):
    net, ctx, adv = _with_suite(trained)
    state = ctx.attack(0.1)
    assert net.rows == len(ctx.y)  # one fresh forward pass on the suite's points, no PGD step
    assert state.origin == "suite" and ctx.attack(0.1) is state
    assert torch.equal(state.x_adv, adv)  # an attack's output is inside the ball: held as it is
    with torch.no_grad():
        assert torch.equal(state.right, trained(adv).argmax(1) == ctx.y)
    assert 0 < state.accuracy < ctx.clean_accuracy()  # the suite fooled some examples, not all


def test_below_the_threats_eps_only_the_examples_fooled_in_the_larger_ball_are_attacked(trained):
    net, ctx, _ = _with_suite(trained, sweep_steps=4)
    clean = ctx.logits().argmax(1) == ctx.y
    top = ctx.attack(0.1)
    net.rows = 0
    half = ctx.attack(0.05)
    fooled, held = clean & ~top.right, clean & top.right
    assert bool(fooled.any()) and bool(held.any())  # both kinds occur
    assert net.rows <= 4 * int(fooled.sum()) + len(ctx.y)  # 4 steps on the fooled ones, one fresh forward pass
    assert torch.equal(half.x_adv[held], ctx.x[held])  # right in the larger ball: counted right, not attacked
    assert torch.equal(half.right[held], held[held])
    assert float((half.x_adv - ctx.x).abs().amax()) <= 0.05 + 1e-6  # float32 pixels <= 1: one rounding
    with torch.no_grad():
        assert torch.equal(half.right, trained(half.x_adv).argmax(1) == ctx.y)  # a fresh forward pass
    quarter = ctx.attack(0.025)  # continues 0.05, the nearest larger radius
    for small, large in ((quarter, half), (half, top)):
        assert not bool((large.right & ~small.right).any())  # right at the larger radius: right here
    assert quarter.start == 0.05 and half.start == 0.1


def test_above_the_threats_eps_the_run_continues_the_suites_points(trained):
    _, ctx, adv = _with_suite(trained)
    top, big = ctx.attack(0.1), ctx.attack(0.2)
    fooled = ~top.right
    assert torch.equal(big.x_adv[fooled], adv[fooled]) and big.start == 0.1
    assert big.accuracy < top.accuracy  # the larger ball fools more, so the comparison above is not vacuous


def test_sweep_steps_set_each_radius_run_and_steps_the_checks_own_runs(trained):
    net = RowCounter(trained)
    x, y = synthetic_tensors(96, seed=2)
    ctx = CheckContext(net, x, y, ThreatModel(eps=0.1), num_classes=3, steps=10, sweep_steps=2, seed=1)
    ctx.logits()
    net.rows = 0
    state = ctx.attack(0.1)
    assert net.rows <= 3 * len(y)  # 2 steps on at most every example, then a fresh forward pass
    net.rows = 0
    more = ctx.extend(state)
    still = int(more.right.sum())
    assert still > 0 and net.rows >= 10 * still  # the examples still right went through all 10 steps


def test_suite_points_of_another_shape_are_refused(trained):
    import pytest

    x, y = synthetic_tensors(8, seed=2)
    with pytest.raises(ValueError, match="expected suite_adv like the check subset"):
        CheckContext(trained, x, y, ThreatModel(eps=0.1), num_classes=3, suite_adv=x[:4])


def test_the_pgd_runs_with_channels_last_weights_and_puts_the_same_tensors_back(trained):
    seen = []
    conv = next(m for m in trained.modules() if isinstance(m, torch.nn.Conv2d))
    standard = conv.weight.stride()  # with one input channel both layouts are "contiguous": compare strides
    hook = conv.register_forward_pre_hook(lambda m, _: seen.append(m.weight.stride() != standard))
    before = [(p.data_ptr(), p.requires_grad) for p in trained.parameters()]
    try:
        _ctx(trained).attack(0.1)
    finally:
        hook.remove()
    # the clean logits and the fresh forward pass that scores the run in the model's layout, the PGD steps not
    assert len(seen) > 2 and all(seen[1:-1]) and not seen[0] and not seen[-1]
    assert [(p.data_ptr(), p.requires_grad) for p in trained.parameters()] == before
    assert conv.weight.stride() == standard


class _Viewing(torch.nn.Module):
    """A convolution whose output is flattened by .view(): it breaks on a channels_last activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


def test_a_model_that_breaks_on_channels_last_is_attacked_in_its_own_layout():
    model = _Viewing().eval()
    x, y = synthetic_tensors(24, seed=2)
    with torch.no_grad():  # the model does break on that layout, so the fallback is what this test runs
        from harden.attacks.base import channels_last_weights

        restore = channels_last_weights(model, x)
        try:
            import pytest

            with pytest.raises(RuntimeError):
                model(x)
        finally:
            restore()
    standard, ptr = model.conv.weight.stride(), model.conv.weight.data_ptr()
    state = CheckContext(model, x, y, ThreatModel(eps=0.3), num_classes=3, steps=5).attack(0.3)
    with torch.no_grad():
        assert torch.equal(state.right, model(state.x_adv).argmax(1) == y)
    assert model.conv.weight.stride() == standard and model.conv.weight.data_ptr() == ptr  # the same tensor back
    assert model.conv.weight.requires_grad


class _Broken(torch.nn.Module):
    """Fails on every gradient pass with an error that is not about memory layout."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("the model's own failure")
        return self.conv(x).mean((2, 3))


def test_an_error_of_the_model_that_is_not_about_layout_propagates():
    import pytest

    x, y = synthetic_tensors(8, seed=2)
    model = _Broken().eval()
    standard, ptr = model.conv.weight.stride(), model.conv.weight.data_ptr()
    with pytest.raises(RuntimeError, match="the model's own failure"):
        CheckContext(model, x, y, ThreatModel(eps=0.1), num_classes=3, steps=2).attack(0.1)
    assert model.conv.weight.stride() == standard and model.conv.weight.data_ptr() == ptr  # put back on the way out
    assert model.conv.weight.requires_grad


class _Band(torch.nn.Module):
    """Deterministic: wrong (class 1) only where the image mean lies near 0.575, right (class 0) elsewhere."""

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(m), 1.0 - 1000 * (m - 0.575) ** 2], 1)


def test_the_sweep_never_rises_without_the_suites_outcome_whatever_order_the_radii_come_in():
    """Without suite_adv every radius continues the one below: the order of the list must not matter. (The band
    model is wrong only in a thin shell of image means, so independent runs per radius do rise.)"""
    x, y = torch.full((8, 1, 4, 4), 0.5), torch.zeros(8, dtype=torch.long)
    ctx = CheckContext(_Band(), x, y, ThreatModel(eps=0.3), num_classes=2, steps=1, sweep_steps=1)
    states = ctx.sweep([0.15, 0.075, 0.3, 0.45, 0.6, 0.15])
    assert list(states) == [0.075, 0.15, 0.3, 0.45, 0.6]  # smallest first, each once
    accs = [states[e].accuracy for e in sorted(states)]
    assert accs[0] < 1.0  # the smallest radius fools some examples, so the comparison below tests something
    assert all(b <= a for a, b in itertools.pairwise(accs)), accs


def test_with_the_suites_outcome_the_sweep_goes_down_from_the_threats_eps_then_up(trained):
    _, ctx, _ = _with_suite(trained)
    heard = []
    states = ctx.sweep([0.2, 0.025, 0.1, 0.05], on_radius=heard.append)
    assert heard == [0.05, 0.025, 0.1, 0.2] and states[0.1].origin == "suite"
    accs = [states[e].accuracy for e in sorted(states)]
    assert all(b <= a for a, b in itertools.pairwise(accs)) and accs[0] > accs[-1], accs


def test_suite_points_are_held_inside_the_ball_and_must_match_the_subset():
    import pytest

    x, y = synthetic_tensors(8, seed=2)
    far = (x + 0.5).clamp(0, 1.5)  # outside the eps ball and the box
    ctx = CheckContext(_Band(), x, y, ThreatModel(eps=0.1), num_classes=3, suite_adv=far)
    assert ctx.suite_adv is not None
    assert float((ctx.suite_adv - x).abs().amax()) <= 0.1 + 1e-6  # float32 pixels <= 1: one rounding
    assert float(ctx.suite_adv.min()) >= 0.0 and float(ctx.suite_adv.max()) <= 1.0
    with pytest.raises(ValueError, match="expected suite_adv like the check subset"):
        CheckContext(_Band(), x, y, ThreatModel(eps=0.1), num_classes=3, suite_adv=x.double())
