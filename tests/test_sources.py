import pydantic
import pytest

import harden.policy
from harden.catalog import Catalog
from harden.data import DATASETS
from harden.errors import UnknownNameError
from harden.sources import TIMM_FILE_ARGS, DataSpec, ModelSpec


def _timm(name: str) -> None:
    if name != "resnet10t":
        raise UnknownNameError(f"expected a timm model name, got {name!r}", name=name, suggestions=())


FULL = {"harden": Catalog(datasets=DATASETS, check_model=_timm)}


def test_the_sections_are_the_ones_the_policy_uses():
    assert harden.policy.ModelSpec is ModelSpec and harden.policy.DataSpec is DataSpec
    assert harden.policy.TIMM_FILE_ARGS is TIMM_FILE_ARGS
    assert harden.policy.Policy.model_fields["model"].annotation is ModelSpec


def test_model_names_are_timm_or_code():
    assert ModelSpec.model_validate({"name": "timm:resnet10t"}, context=FULL).name == "timm:resnet10t"
    assert ModelSpec.model_validate({"name": "mypkg.models:Net"}, context=FULL).name == "mypkg.models:Net"
    with pytest.raises(pydantic.ValidationError, match="got 'resnet10x'"):
        ModelSpec.model_validate({"name": "timm:resnet10x"}, context=FULL)
    assert ModelSpec(name="timm:resnet10x").name == "timm:resnet10x"  # no catalog: structure only
    with pytest.raises(pydantic.ValidationError, match=r"expected 'timm:<model name>' or 'package\.module:attr'"):
        ModelSpec(name="resnet10t")
    with pytest.raises(pydantic.ValidationError, match="a dotted Python module name, then one public name"):
        ModelSpec(name="os:system()")


def test_data_names_are_registered_or_code():
    assert DataSpec.model_validate({"name": "digits"}, context=FULL).name == "digits"
    assert DataSpec.model_validate({"name": "mypkg.data:load"}, context=FULL).name == "mypkg.data:load"
    with pytest.raises(pydantic.ValidationError, match="digits"):  # the close match
        DataSpec.model_validate({"name": "digit"}, context=FULL)
    assert DataSpec(name="digit").name == "digit"  # no catalog: structure only
    with pytest.raises(pydantic.ValidationError, match="a dotted Python module name, then one public name"):
        DataSpec(name="my pkg:load")


@pytest.mark.parametrize("key", [*sorted(TIMM_FILE_ARGS), "pretrained_strict"])
def test_timm_models_take_no_argument_that_loads_files(key):
    with pytest.raises(pydantic.ValidationError) as info:
        ModelSpec(name="timm:resnet10t", args={key: "x"})
    err = info.value.errors()[0]
    assert err["ctx"]["path"] == f"args.{key}" and "model.pretrained_file" in err["msg"]
    assert ModelSpec(name="mypkg:factory", args={key: "x"}).args == {key: "x"}  # the user's own factory decides


def test_mean_and_std_come_together_with_equal_lengths_and_positive_std():
    assert ModelSpec(mean=[0.5], std=[0.25]).std == (0.25,)
    for bad, msg in (
        ({"mean": [0.5]}, "both mean and std, or neither"),
        ({"mean": [0.5, 0.5], "std": [1.0]}, "equal length, got 2 and 1"),
        ({"mean": [0.5], "std": [0.0]}, r"every std > 0, got \[0.0\]"),
    ):
        with pytest.raises(pydantic.ValidationError, match=msg):
            ModelSpec.model_validate(bad)


@pytest.mark.parametrize("output", [None, "logits", "out_1", 0, 2])
def test_model_output_takes_a_key_an_attribute_or_an_item_index(output):
    assert ModelSpec(output=output).output == output


@pytest.mark.parametrize(
    ("output", "match"),
    [(-1, "item index >= 0"), ("logits[0]", "key/attribute name"), ("", "key/attribute name"), (1.5, "output")],
)
def test_model_output_refuses_what_reads_no_logits(output, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        ModelSpec(output=output)
