"""harden.objectives.ce: cross-entropy on the clean batch, with optional label smoothing."""

import torch
import torch.nn.functional as F
from helpers_objectives import THREAT, make_objective, tiny_model

from harden.objectives import BatchContext
from harden.testing import synthetic_tensors


def test_ce_is_cross_entropy_and_label_smoothing():
    model = tiny_model()
    x, y = synthetic_tensors(8)
    logits = model(x)
    ce = make_objective("ce").loss(BatchContext(model, x, y, THREAT))
    torch.testing.assert_close(ce, F.cross_entropy(logits, y), rtol=0, atol=1e-6)
    smooth = make_objective("ce", label_smoothing=0.2).loss(BatchContext(model, x, y, THREAT))
    torch.testing.assert_close(smooth, F.cross_entropy(logits, y, label_smoothing=0.2), rtol=0, atol=1e-6)


def test_ce_reads_no_view():
    assert make_objective("ce").views() == ()
