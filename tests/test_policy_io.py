import ast
from pathlib import Path

import pytest

import harden
from harden.attacks import ATTACKS
from harden.objectives import OBJECTIVES
from harden.policy import AttackSpec, Catalog, ObjectiveSpec, Policy
from harden.policy_io import CATALOG, checked, dump_policy, policy_hash, validate_policy

ROOT = Path(harden.__file__).parent


@pytest.mark.parametrize(
    ("module", "allowed"),
    [("policy.py", {"harden.errors", "harden.schema"}), ("schema.py", {"harden.errors", "harden.registry"})],
)
def test_the_policy_modules_are_a_pure_schema(module, allowed):
    tree = ast.parse((ROOT / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("harden")} == allowed


def test_the_catalog_is_complete_and_a_validated_policy_is_checked():
    assert CATALOG.complete and not Catalog().complete
    policy = validate_policy({"objectives": [{"name": "pgd_at"}], "verify": {"attacks": [{"name": "pgd"}]}})
    assert policy.checked


def test_specs_carry_their_validated_params_so_they_are_validated_once():
    policy = validate_policy({"objectives": [{"name": "trades", "params": {"beta": 2}}]})
    spec = policy.objectives[0]
    params = spec.checked_params
    assert isinstance(params, OBJECTIVES.get("trades").Params) and params.beta == 2
    assert spec.params == params.model_dump(mode="json")  # the dump (and the hash) has every default
    objective = OBJECTIVES.get("trades")(spec.params_for_build(), policy.threat)
    assert objective.params is params  # handed over, not validated again
    attack = policy.verify.attacks[1]
    assert isinstance(attack.checked_params, ATTACKS.get(attack.name).Params)


def test_without_a_catalog_names_and_params_are_left_for_later():
    raw = Policy(objectives=[ObjectiveSpec(name="pgd_at", params={"steps": 2})])
    assert not raw.checked and raw.objectives[0].checked_params is None
    assert raw.objectives[0].params == {"steps": 2}
    good = checked(raw)
    assert good.checked and good.objectives[0].params["steps"] == 2 and "step_size" in good.objectives[0].params
    assert checked(good) is good
    assert policy_hash(raw) == policy_hash(good) and dump_policy(raw) == dump_policy(good)
    with pytest.raises(harden.PolicyError, match="did you mean 'pgd_at'"):
        checked(Policy(objectives=[ObjectiveSpec(name="pgd-at")]))


def test_defaults_are_checked_like_written_sections():
    policy = validate_policy({"objectives": [{"name": "ce"}]})
    assert all(a.checked_params is not None for a in policy.verify.attacks)
    assert policy.verify.attacks[1].params["steps"] == 40 and "restarts" in policy.verify.attacks[1].params


def test_a_copy_with_changes_is_unchecked_and_never_builds_stale_params():
    good = validate_policy({"objectives": [{"name": "pgd_at"}], "verify": {"attacks": [{"name": "pgd"}]}})
    spec = good.verify.attacks[0].model_copy(update={"params": {"steps": 2}})
    assert spec.checked_params is None and spec.params_for_build() == {"steps": 2}
    assert ATTACKS.get("pgd")(good.threat, spec.params_for_build()).params.steps == 2
    bad = good.model_copy(update={"objectives": (ObjectiveSpec(name="pgd_at", params={"steps": -5}),)})
    assert not bad.checked
    with pytest.raises(harden.PolicyError, match="steps"):
        checked(bad)
    same = good.model_copy(update={"objectives": (ObjectiveSpec(name="pgd_at"),)})
    assert policy_hash(same) == policy_hash(good)
    assert good.model_copy().checked  # a plain copy stays checked


def test_a_spec_handed_in_is_checked_and_the_callers_object_left_alone():
    spec = ObjectiveSpec(name="pgd_at")
    policy = validate_policy({"objectives": [spec]})
    assert spec.params == {} and spec.checked_params is None
    assert policy.objectives[0].params["steps"] == 7 and policy.checked


def test_entry_points_check_a_policy_built_in_python():
    from harden.testing import TinyCNN, synthetic_tensors

    raw = Policy(
        objectives=[ObjectiveSpec(name="ce")],
        verify={"attacks": [AttackSpec(name="pgd", params={"steps": 2})], "n_examples": 8, "checks": False},
    )
    report = harden.verify(TinyCNN(num_classes=3), raw, synthetic_tensors(8), progress=False)
    assert report.attacks[0]["params"]["restarts"] == 1  # filled like a loaded policy's
