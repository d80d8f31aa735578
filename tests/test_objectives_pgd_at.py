"""harden.objectives.pgd_at: cross-entropy on the PGD view of the batch (Madry et al.)."""

import torch
import torch.nn.functional as F
from helpers_objectives import THREAT, make_objective, tiny_model

from harden.objectives import BatchContext, pgd_view
from harden.testing import synthetic_tensors


def test_pgd_at_trains_on_adversarial_inputs():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    ctx = BatchContext(model, x, y, THREAT)
    loss = make_objective("pgd_at").loss(ctx)
    (adv,) = ctx._views.values()
    torch.testing.assert_close(loss, F.cross_entropy(model(adv), y), rtol=0, atol=1e-6)
    assert not torch.equal(adv, x)


def test_pgd_at_reads_the_shared_pgd_view():
    assert make_objective("pgd_at", steps=3).views() == (pgd_view(3),)
