import ast
from pathlib import Path

import pytest
import torch

import harden
from harden._cascade import prepared_attacks
from harden.attacks.base import AttackEnv
from harden.attacks.suite import attack_spec
from harden.attacks.transfer import Transfer, TransferParams
from harden.data import synthetic_bundle
from harden.policy import ThreatModel
from harden.surrogate import attach_surrogates, build_surrogate, needs_surrogate, surrogate_policy
from harden.testing import TinyCNN, tiny_policy

CPU = torch.device("cpu")


def test_surrogate_policy_is_plain_ce_on_the_policy_data():
    policy = tiny_policy()
    p = surrogate_policy(policy, TransferParams(epochs=2, model="harden.testing:TinyMLP"))
    assert [o.name for o in p.objectives] == ["ce"] and p.train.epochs == 2
    assert p.train.probe_examples == 0 and p.train.keep_checkpoints == 1
    assert p.model.name == "harden.testing:TinyMLP" and p.data == policy.data and p.seed == policy.seed
    assert p.checked


def test_build_surrogate_is_seeded_apart_and_leaves_the_global_rng_alone():
    policy, bundle = tiny_policy(), synthetic_bundle()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_surrogate(TransferParams(epochs=1), policy, bundle, CPU)
    after = torch.rand(3)
    b = build_surrogate(TransferParams(epochs=1), policy, bundle, CPU)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    assert not a.training and not b.training
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)  # seeded with policy.seed + 1: reproducible


def test_attach_shares_one_surrogate_per_params_and_keeps_given_ones():
    threat = ThreatModel(eps=0.1)
    given = TinyCNN(num_classes=3)
    a, b, c = (Transfer(threat, {"epochs": 1}) for _ in range(3))
    d = Transfer(threat, {"epochs": 2})
    c.surrogate = given
    attach_surrogates([a, b, c, d], tiny_policy(), synthetic_bundle(), CPU)
    assert a.surrogate is b.surrogate and a.surrogate is not None
    assert c.surrogate is given
    assert d.surrogate is not None and d.surrogate is not a.surrogate
    assert not needs_surrogate(a) and needs_surrogate(Transfer(threat))


def test_transfer_never_trains_and_says_what_to_do_without_a_surrogate():
    atk = Transfer(ThreatModel(eps=0.1))
    with pytest.raises(harden.DataError, match="expected a surrogate model"):
        atk.prepare(AttackEnv(policy=tiny_policy(), bundle=synthetic_bundle()))
    source = Path(harden.attacks.transfer.__file__).read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith(("harden.train", "harden.surrogate", "harden.fit")) for m in imported)


def test_prepared_attacks_loads_the_policy_data_only_when_an_attack_needs_it(monkeypatch):
    calls = []

    def counted(spec):
        calls.append(spec.name)
        return synthetic_bundle()

    monkeypatch.setattr(harden._cascade, "load_data", counted)
    policy = tiny_policy()
    prepared_attacks([attack_spec("fgsm")], policy, None, CPU)
    assert calls == []
    lp, _, _ = prepared_attacks([attack_spec("transfer", {"epochs": 1})], policy, None, CPU)
    assert calls == ["synthetic"] and lp[0].surrogate is not None
    prepared_attacks([attack_spec("transfer")], policy, None, CPU, surrogate=TinyCNN(num_classes=3))
    assert calls == ["synthetic"]  # a given surrogate needs no data
    prepared_attacks([attack_spec("transfer", {"epochs": 1})], policy, synthetic_bundle(), CPU)
    assert calls == ["synthetic"]  # a given bundle is used as it is


def test_without_the_policy_data_invariance_examples_falls_back_to_the_batch_with_a_warning(monkeypatch):
    def broken(spec):
        raise harden.DataError("expected data.root, got none")

    monkeypatch.setattr(harden._cascade, "load_data", broken)
    with pytest.warns(UserWarning, match="searches the attacked batch"):
        _, other, _ = prepared_attacks([attack_spec("invariance_examples")], tiny_policy(), None, CPU)
    assert other[0].pool is None
    with pytest.raises(harden.DataError, match=r"data\.root"):  # a surrogate cannot be trained without it
        prepared_attacks([attack_spec("transfer")], tiny_policy(), None, CPU)


def test_a_surrogate_named_from_another_package_is_refused_before_it_is_built(monkeypatch):
    import sys
    import types

    calls = []
    mine = types.ModuleType("mysurrogate_h.nets")
    exec("from harden.testing import TinyCNN\n", mine.__dict__)  # harden's class, re-exported by mysurrogate_h
    monkeypatch.setitem(sys.modules, "mysurrogate_h.nets", mine)
    monkeypatch.setattr("harden.tiny.TinyCNN.__init__", lambda self, **kw: calls.append(kw))
    params = TransferParams(model="mysurrogate_h.nets:TinyCNN", epochs=1)
    with pytest.raises(
        harden.ModelError,
        match=r"^expected 'mysurrogate_h\.nets:TinyCNN' to be defined in package "
        r"'mysurrogate_h', got an object from 'harden\.tiny'",
    ):
        build_surrogate(params, tiny_policy(), synthetic_bundle(), torch.device("cpu"))
    assert calls == []
