"""harden.objectives.trades: TRADES is clean CE plus beta times a KL term that is never negative."""

import torch
import torch.nn.functional as F
from helpers_objectives import THREAT, make_objective, tiny_model

from harden.objectives import BatchContext
from harden.testing import synthetic_tensors


def test_trades_with_beta_zero_is_clean_ce():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    loss = make_objective("trades", beta=0.0).loss(BatchContext(model, x, y, THREAT))
    reference = F.cross_entropy(model(x), y)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)


def test_trades_kl_term_is_non_negative():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    ce = F.cross_entropy(model(x), y)
    trades = make_objective("trades", beta=6.0).loss(BatchContext(model, x, y, THREAT))
    assert trades >= ce - 1e-6  # KL >= 0; float32 CE ~ 1.1 and an 8-row KL round to <= ~2e-7


def test_trades_reads_one_kl_pgd_view():
    obj = make_objective("trades", steps=3)
    (view,) = obj.views()
    assert view.attack == "pgd" and dict(view.params)["loss"] == "kl" and dict(view.params)["steps"] == 3
