"""The contract every registered objective keeps (harden.testing.check_objective), for each name in the registry.

Each objective's own behaviour is tested in tests/test_objectives_<module>.py.
"""

import pytest
import timm
import torch

from harden.models import Normalized
from harden.objectives import OBJECTIVES
from harden.testing import check_objective

CONTRACT = pytest.mark.parametrize("name", OBJECTIVES.names())


@CONTRACT
def test_contract_on_tinycnn(name):
    check_objective(OBJECTIVES.get(name))


@CONTRACT
def test_contract_on_timm_resnet10t(name):
    torch.manual_seed(0)
    model = Normalized(timm.create_model("resnet10t", num_classes=3, in_chans=1)).train()
    check_objective(OBJECTIVES.get(name), model=model, input_shape=(4, 1, 16, 16))


def test_every_builtin_objective_is_checked():
    names = set(OBJECTIVES.names())
    assert {"ce", "gaussian_aug", "pgd_at", "trades", "mi", "ot_metric", "jsigr", "iwd_at"} <= names
