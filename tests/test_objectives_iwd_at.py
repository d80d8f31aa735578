"""harden.objectives.iwd_at: training on IWD adversarial examples inside the rho budget."""

import torch
import torch.nn.functional as F

import harden
from harden.objectives import OBJECTIVES, ObjectiveSet
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors

THREAT = ThreatModel(eps=0.1, rho=2e-3)


def _prepare(names_params, model, x, y):
    weighted = [(1.0, OBJECTIVES.get(n)(p, THREAT)) for n, p in names_params]
    objs = ObjectiveSet(model, weighted, x[:1])
    return objs, objs.context(x, y, THREAT)


def test_iwd_at_trains_on_iwd_examples_within_budget():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8)
    params = {"steps": 3, "clean_weight": 0.0, "fraction": 0.5, "patch_size": 2, "stride": 2}
    objs, ctx = _prepare([("iwd_at", params)], model, x, y)
    obj = objs.weighted[0][1]
    loss = obj.loss(ctx)
    x_iwd, y_iwd, _ = obj.examples(ctx)
    assert x_iwd.shape[0] == 4 and torch.equal(y_iwd, y[:4])
    assert float(harden.ot.iwd(x[:4], x_iwd, k=2, stride=2).max()) <= THREAT.rho * 1.01 + 1e-9
    assert float((x_iwd - x[:4]).abs().max()) > 0
    # same batch through the model in train mode: BatchNorm uses the same batch statistics
    torch.testing.assert_close(loss, F.cross_entropy(model(x_iwd), y_iwd))
    kl = OBJECTIVES.get("iwd_at")({**params, "loss": "kl"}, THREAT)
    assert float(kl.loss(ctx).detach()) >= 0
