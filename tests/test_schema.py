import pydantic
import pydantic_core
import pytest

from harden.attacks import ATTACKS
from harden.objectives import OBJECTIVES
from harden.schema import HALF_LEVEL, AttackSpec, Catalog, CertifySpec, ObjectiveSpec, ThreatModel


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


# --------------------------------------------------------------------------- strict values


@pytest.mark.parametrize(
    ("section", "data", "kind"),
    [
        (ThreatModel, {"eps": True}, "float_type"),  # a bool is never a number (lax pydantic made it 1.0)
        (ThreatModel, {"eps": "0.1"}, "float_type"),  # a string is never a number
        (ThreatModel, {"rho": False}, "float_type"),
        (ObjectiveSpec, {"name": "ce", "every": True}, "int_type"),
        (ObjectiveSpec, {"name": "ce", "every": 2.0}, "int_type"),  # a float is not an integer either
        (CertifySpec, {"smoothing": 1}, "bool_type"),  # a number is never a bool
        (CertifySpec, {"smoothing": "yes"}, "bool_type"),
        (CertifySpec, {"radii": [0.5, True]}, "float_type"),  # the items of a list too
    ],
)
def test_values_are_strict(section, data, kind):
    with pytest.raises(pydantic.ValidationError) as info:
        section.model_validate(data)
    assert info.value.errors()[0]["type"] == kind


def test_integers_stay_fine_for_floats_and_lists_for_tuples():
    assert ThreatModel.model_validate({"eps": 1}).eps == 1.0
    assert isinstance(ThreatModel.model_validate({"eps": 1}).eps, float)
    assert CertifySpec.model_validate({"radii": [1, 0.5]}).radii == (1.0, 0.5)


def test_params_are_validated_strictly_whatever_their_own_config():
    from pydantic import BaseModel

    from harden.schema import _validate_params

    class LaxParams(BaseModel):  # a plugin's Params: pydantic's lax default config
        scale: float = 1.0
        flag: bool = False
        sizes: tuple[int, ...] | None = None

    assert LaxParams.model_validate({"scale": True}).scale == 1.0  # what lax validation would let through
    ok = _validate_params("objective", "x", LaxParams, {"scale": 2, "sizes": [1, 2]})
    assert ok == LaxParams(scale=2.0, sizes=(1, 2))
    for bad in ({"scale": True}, {"flag": 1}, {"scale": "2"}, {"sizes": [1, True]}):
        with pytest.raises(pydantic_core.PydanticCustomError):
            _validate_params("objective", "x", LaxParams, bad)


def test_the_moved_names_are_still_importable_from_here():
    import harden.catalog
    import harden.coderef
    import harden.schema

    for module in (harden.catalog, harden.coderef):
        for name in module.__all__:
            assert getattr(harden.schema, name) is getattr(module, name), name
            assert name in harden.schema.__all__


def test_below_half_level():
    assert HALF_LEVEL == 0.5 / 255
    assert ThreatModel(eps=1e-300).below_half_level and ThreatModel(norm="l2", eps=1e-3).below_half_level
    assert not ThreatModel(eps=HALF_LEVEL).below_half_level  # below, strictly
    assert not ThreatModel(eps=1 / 255).below_half_level and not ThreatModel(norm="l2", eps=0.5).below_half_level
