import pydantic
import pytest

from harden.attacks import ATTACKS
from harden.objectives import OBJECTIVES
from harden.schema import AttackSpec, Catalog, ObjectiveSpec, ThreatModel


def test_partial_catalogs_check_only_what_they_hold():
    only_attacks = {"harden": Catalog(attacks=ATTACKS)}
    spec = AttackSpec.model_validate({"name": "pgd", "params": {"steps": 3}}, context=only_attacks)
    assert spec.checked_params is not None and spec.params["restarts"] == 1
    with pytest.raises(Exception, match="registered attacks"):
        AttackSpec.model_validate({"name": "nope"}, context=only_attacks)
    unchecked = ObjectiveSpec.model_validate({"name": "nope"}, context=only_attacks)
    assert unchecked.checked_params is None



def test_a_params_error_names_the_nested_key_and_the_close_match():
    ctx = {"harden": Catalog(objectives=OBJECTIVES)}
    with pytest.raises(pydantic.ValidationError) as info:
        ObjectiveSpec.model_validate({"name": "trades", "params": {"betta": 1}}, context=ctx)
    err = info.value.errors()[0]
    assert err["ctx"]["path"] == "params.betta" and "did you mean 'beta'" in err["msg"]
    with pytest.raises(pydantic.ValidationError, match="expected one of"):
        ObjectiveSpec.model_validate({"name": "trades", "params": {"zzzz": 1}}, context=ctx)


def test_n_examples_only_on_attacks_outside_the_lp_worst_case():
    ctx = {"harden": Catalog(attacks=ATTACKS)}
    assert AttackSpec.model_validate({"name": "iwd", "n_examples": 5}, context=ctx).n_examples == 5
    with pytest.raises(pydantic.ValidationError, match="outside the l_p worst case"):
        AttackSpec.model_validate({"name": "pgd", "n_examples": 5}, context=ctx)


def test_threat_model_bounds():
    assert ThreatModel(norm="l2", eps=3.0).eps == 3.0
    with pytest.raises(pydantic.ValidationError, match="eps <= 1"):
        ThreatModel(norm="linf", eps=1.5)
    with pytest.raises(pydantic.ValidationError):
        ThreatModel(eps=0)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        ThreatModel().eps = 0.2  # type: ignore[misc]
