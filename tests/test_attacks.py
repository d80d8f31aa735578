"""The contract every registered attack keeps (harden.testing.check_attack), for each name in the registry.

Each attack's own behaviour is tested in tests/test_attacks_<module>.py.
"""

import pytest

from harden.attacks import ATTACKS
from harden.policy import ThreatModel
from harden.testing import check_attack

CONTRACT = pytest.mark.parametrize("name", ATTACKS.names())


@CONTRACT
def test_contract(name):
    check_attack(ATTACKS.get(name))


@pytest.mark.gpu
@CONTRACT
def test_contract_on_cuda(name):
    # a transfer surrogate is prepared on the GPU; inputs on the CPU must raise "one device"
    check_attack(ATTACKS.get(name), ThreatModel(norm="linf", eps=0.1), device="cuda")


def test_every_builtin_attack_is_checked():
    names = set(ATTACKS.names())
    assert {"fgsm", "pgd", "apgd_ce", "apgd_t", "fab_t", "square", "noise", "transfer"} <= names
    assert {"invariance", "invariance_examples", "iwd"} <= names
