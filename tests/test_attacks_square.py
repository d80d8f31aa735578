"""harden.attacks.square: Square, the score-based black-box attack (no gradients, query counts, strength).

The strength checks run on TinyCNN trained on synthetic data and on scikit-learn's digits (359 test
images); the cross-checks against torchattacks are marked slow.
"""

import pytest
import torch
from helpers_attacks import acc, assert_not_weaker, check_box_edge, check_inside_ball_and_box, check_same_seed
from torch import nn

import harden
from harden.attacks.base import ATTACKS
from harden.attacks.square import Square, margin, p_schedule
from harden.policy import ThreatModel

LINF, L2 = ThreatModel(norm="linf", eps=0.1), ThreatModel(norm="l2", eps=0.5)

THREATS = pytest.mark.parametrize("threat", [LINF, L2], ids=["linf", "l2"])


def make(threat, **params):
    return Square(threat, {"n_queries": 200, **params})


def test_models_are_accurate(synthetic_cnn, digits_cnn):
    assert acc(*synthetic_cnn) >= 0.9
    assert acc(*digits_cnn) >= 0.9


def test_registered_as_a_black_box_attack():
    assert ATTACKS.get("square") is Square
    assert Square.white_box is False and Square.bounded
    assert Square(LINF).params.model_dump() == {"n_queries": 5000, "p_init": 0.8, "restarts": 1}


@pytest.mark.parametrize("params", [{"n_queries": 0}, {"p_init": 1.5}, {"steps": 3}])
def test_bad_params_raise(params):
    with pytest.raises(harden.PolicyError):
        ATTACKS.get("square")(LINF, params)


@THREATS
@pytest.mark.parametrize("data", ["synthetic_cnn", "digits_cnn"])
def test_inside_ball_and_box(threat, data, request):
    check_inside_ball_and_box(make, threat, *request.getfixturevalue(data))


def test_inputs_on_the_box_edge(synthetic_cnn):
    check_box_edge(make, synthetic_cnn[0], (LINF, L2))


@THREATS
def test_same_result_under_the_same_seed(threat, synthetic_cnn):
    check_same_seed(make, threat, *synthetic_cnn)


class NoGradSpy(nn.Module):
    """Records, per forward call, whether autograd was on and how many rows were queried."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad_enabled = []
        self.rows = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled() or x.requires_grad)
        self.rows.append(x.shape[0])
        return self.net(x)


def test_square_schedule_and_margin():
    assert [p_schedule(i, 10_000, 0.8) for i in (0, 10, 11, 50, 51, 8000, 8001)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.8 / 256,
        0.8 / 512,
    ]
    assert p_schedule(500, 5000, 0.8) == p_schedule(1000, 10_000, 0.8)  # rescaled to the budget
    assert margin(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([1])).item() == 1.0


@THREATS
def test_square_uses_no_gradients_and_counts_its_queries(threat, synthetic_cnn):
    net, x, y = synthetic_cnn
    spy = NoGradSpy(net)
    attack = Square(threat, {"n_queries": 150})
    adv = attack(spy, x, y)
    assert spy.grad_enabled and not any(spy.grad_enabled)
    counts = attack.last_query_counts
    assert counts.shape == (x.shape[0],) and int(counts.max()) <= 150
    assert attack.last_queries == pytest.approx(counts.float().mean().item())
    # every row the model saw is accounted for: one clean pass plus the counted queries
    assert sum(spy.rows) == x.shape[0] + int(counts.sum())
    with torch.no_grad():
        clean_wrong = net(x).argmax(1) != y  # the same 96-row forward as the attack's clean pass
    # fooled as the attack measured it: a forward of the whole returned batch may read an example
    # stopped just below margin 0 differently (other batch shape), so it is not the reference here
    margins = attack.last_margins
    assert margins.shape == (x.shape[0],) and torch.equal(margins[clean_wrong] < 0, clean_wrong[clean_wrong])
    fooled = (margins < 0) & ~clean_wrong
    assert (counts[clean_wrong] == 0).all()  # never queried
    assert (counts[~fooled & ~clean_wrong] == 150).all()  # the others used the whole budget
    stopped = (counts < 150) & ~clean_wrong
    assert (margins[stopped] < 0).all() and (counts[stopped] >= 1).all()  # a row stops only once fooled
    assert int(stopped.sum()) > 0  # and some did stop early
    assert (adv[fooled] != x[fooled]).flatten(1).any(1).all()  # every fooled example moved


@pytest.mark.parametrize(("norm", "eps_synthetic", "eps_digits"), [("linf", 0.1, 0.1), ("l2", 1.0, 0.5)])
def test_square_lowers_accuracy(norm, eps_synthetic, eps_digits, synthetic_cnn, digits_cnn):
    for (model, x, y), eps in ((synthetic_cnn, eps_synthetic), (digits_cnn, eps_digits)):
        torch.manual_seed(0)
        adv = Square(ThreatModel(norm=norm, eps=eps), {"n_queries": 300})(model, x[:150], y[:150])
        assert acc(model, adv, y[:150]) < acc(model, x[:150], y[:150]) - 0.1


def test_square_restarts_only_attack_the_rest(synthetic_cnn):
    net, x, y = synthetic_cnn
    spy = NoGradSpy(net)
    attack = Square(LINF, {"n_queries": 40, "restarts": 3})
    attack(spy, x, y)
    assert int(attack.last_query_counts.max()) <= 3 * 40
    assert sum(spy.rows) == x.shape[0] + int(attack.last_query_counts.sum())


def test_square_reports_progress(synthetic_cnn):
    net, x, y = synthetic_cnn
    attack = Square(LINF, {"n_queries": 120, "restarts": 2})
    done: list[float] = []
    attack.on_progress = done.append
    attack(net, x, y)
    assert len(done) >= 2 and done == sorted(done)  # every 50 iterations and at each restart's end
    assert done[0] == 0.0 and done[-1] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("threat", "ta_norm"),
    [(ThreatModel(norm="linf", eps=0.1), "Linf"), (ThreatModel(norm="l2", eps=0.5), "L2")],
    ids=["linf", "l2"],
)
def test_square_at_least_as_strong_as_torchattacks(threat, ta_norm, digits_cnn):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits_cnn  # 359 images
    torch.manual_seed(0)
    adv = Square(threat, {"n_queries": 1000})(model, x, y)
    ref_adv = torchattacks.Square(model, norm=ta_norm, eps=threat.eps, n_queries=1000, seed=0)(x, y)
    assert acc(model, adv, y) < acc(model, x, y)
    # exact one-sided McNemar test on the examples only one of the two attacks breaks
    assert_not_weaker(model, adv, ref_adv, y)
