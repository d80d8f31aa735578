"""harden.attacks.transfer: PGD on a surrogate (built by harden.surrogate, or given), applied to the target."""

import pytest
import torch

import harden
from harden.attacks import ATTACKS
from harden.attacks.base import AttackEnv
from harden.attacks.transfer import Transfer
from harden.surrogate import attach_surrogates
from harden.testing import TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_transfer_trains_a_surrogate_and_transfers(trained):
    policy = tiny_policy(train={"epochs": 2})
    atk = ATTACKS.get("transfer")(policy.threat, {"epochs": 2, "steps": 10})
    state = torch.get_rng_state()
    attach_surrogates([atk], policy, synthetic_bundle(), torch.device("cpu"))  # as harden.verify does
    atk.prepare(AttackEnv(policy=policy))
    assert torch.equal(state, torch.get_rng_state())  # surrogate training does not touch the caller's RNG
    assert atk.surrogate is not None and atk.surrogate is not trained
    x, y = synthetic_tensors(128, seed=2)
    adv = atk(trained, x, y)
    assert (adv - x).abs().max() <= policy.threat.eps + 1e-6
    assert _acc(trained, adv, y) < _acc(trained, x, y)


def test_a_given_surrogate_is_kept_and_attacked_instead_of_the_target():
    policy = tiny_policy()
    torch.manual_seed(0)
    surrogate = TinyCNN(num_classes=3).eval()
    atk = Transfer(policy.threat, {"steps": 3})
    atk.surrogate = surrogate
    atk.prepare(AttackEnv(policy=policy))  # no training: the surrogate it was given stays
    assert atk.surrogate is surrogate
    x, y = synthetic_tensors(16, seed=3)
    target = TinyCNN(num_classes=3)
    torch.manual_seed(1)
    on_target = atk(target, x, y)
    torch.manual_seed(1)
    on_surrogate = ATTACKS.get("pgd")(policy.threat, {"steps": 3, "select": "last"})(surrogate, x, y)
    assert torch.equal(on_target, on_surrogate)  # the target's gradients play no part


def test_a_transfer_attack_without_a_surrogate_is_a_clear_error():
    x, y = synthetic_tensors(4)
    atk = Transfer(tiny_policy().threat)
    with pytest.raises(harden.DataError, match="surrogate"):
        atk.prepare(AttackEnv(policy=tiny_policy()))  # attacks never train one themselves
    with pytest.raises(harden.DataError, match="surrogate"):
        atk(TinyCNN(num_classes=3), x, y)


def test_the_surrogate_model_is_a_code_reference(tmp_path):
    from harden.attacks.transfer import TransferParams
    from harden.coderef import is_code_ref
    from harden.policy_io import code_references, load_policy

    assert is_code_ref(TransferParams.model_fields["model"])
    with pytest.raises(ValueError, match="a dotted Python module name, then one public name"):
        TransferParams(model="os..path:join")
    path = tmp_path / "p.yaml"
    path.write_text(
        "objectives: [{name: ce}]\nverify: {attacks: [{name: fgsm}, {name: transfer, params: {model: 'os:system'}}]}\n"
    )
    with pytest.raises(harden.PolicyError, match=r"verify\.attacks\.1\.params\.model: 'os:system' is code"):
        load_policy(path)
    policy = load_policy(path, allow_code=["os"])
    assert [r.path for r in code_references(policy)] == ["verify.attacks.1.params.model"]
    assert TransferParams(model="timm:resnet10t").model == "timm:resnet10t"  # not code: timm builds it
