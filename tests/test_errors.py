"""harden.errors: one hierarchy (each error also its builtin) and the one-line messages for validation errors."""

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

import harden
from harden import errors
from harden.errors import (
    CheckpointError,
    DataError,
    ExportError,
    HardenError,
    InputError,
    IntegrityError,
    ModelError,
    PolicyError,
    RunFolderError,
    ThreatModelError,
    UnknownNameError,
    describe_validation_error,
    format_key_path,
    format_validation_error,
)

BUILTINS = {
    PolicyError: ValueError,
    UnknownNameError: KeyError,
    DataError: ValueError,
    ModelError: ValueError,
    ThreatModelError: ValueError,
    InputError: ValueError,
    CheckpointError: RuntimeError,
    ExportError: RuntimeError,
    RunFolderError: RuntimeError,
    IntegrityError: ValueError,
}


def test_every_public_error_is_listed_here():
    public = {getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)}
    assert public == {HardenError, *BUILTINS}


@pytest.mark.parametrize(("cls", "builtin"), BUILTINS.items(), ids=[c.__name__ for c in BUILTINS])
def test_every_error_is_a_harden_error_and_its_builtin(cls, builtin):
    assert issubclass(cls, HardenError) and issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("expected something, got something else")
    with pytest.raises(HardenError):
        raise cls("expected something, got something else")


def test_the_package_exports_the_same_classes():
    for cls in (HardenError, PolicyError, UnknownNameError, DataError, ModelError, ThreatModelError):
        assert getattr(harden, cls.__name__) is cls
    assert harden.CheckpointError is CheckpointError and harden.ExportError is ExportError


def test_input_error_is_a_data_error_and_a_threat_model_error():
    assert issubclass(InputError, DataError) and issubclass(InputError, ThreatModelError)
    for catch in (DataError, ThreatModelError, ValueError, HardenError):
        with pytest.raises(catch, match="pixels"):
            raise InputError("expected pixels in [0, 1], got values in [0, 255]")


def test_the_one_input_check_raises_input_error():
    import torch

    from harden.batches import check_pixels

    with pytest.raises(InputError, match=r"pixels in \[0, 1\]"):
        check_pixels(torch.full((1, 1, 2, 2), 255.0))


def test_unknown_name_error_reads_plainly():
    err = UnknownNameError("expected a known objective, got 'pgd-at'; did you mean 'pgd_at'?", "pgd-at", ("pgd_at",))
    assert str(err) == "expected a known objective, got 'pgd-at'; did you mean 'pgd_at'?"  # not KeyError's repr
    assert err.name == "pgd-at" and err.suggestions == ("pgd_at",) and err.message == str(err)
    with pytest.raises(KeyError):
        raise err


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (["train", "lr"], "train.lr"),
        (["objectives", 0, "params", "beta"], "objectives.0.params.beta"),
        (["objectives", 0, "a b"], "objectives.0.'a b'"),
        (["verify", "x.y"], "verify.'x.y'"),
        ([True], "True"),
        ([("a", 1)], "\"('a', 1)\""),
        (["k" * 61], "'" + "k" * 57 + "...'"),
        (["k" * 60], "k" * 60),
        (["data-set_2"], "data-set_2"),
        ([], "(top level)"),
    ],
)
def test_format_key_path(parts, expected):
    assert format_key_path(parts) == expected


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(1.0, ge=0)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1)
    mode: Literal["fast", "slow"] = "fast"
    name: str
    items: list[Inner] = Field(default_factory=list)


def errors_of(data):
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return info.value


def test_describe_validation_error_phrases():
    def first(data):
        return describe_validation_error(errors_of(data).errors()[0])

    assert first({"name": "n", "epochs": 0}) == "expected a number >= 1, got 0"
    assert first({"name": "n", "epochs": "many"}) == "expected an integer, got 'many'"
    assert first({"name": "n", "mode": "medium"}) == "expected one of 'fast' or 'slow', got 'medium'"
    assert first({"name": "n", "surprise": 1}) == "unknown key (not allowed here)"
    assert first({}) == "expected a value, got nothing (required key)"
    assert first({"name": {"a": 1}}) == "expected a string, got a dict"
    long = first({"name": "x" * 100, "epochs": "y" * 100})
    assert long == "expected an integer, got '" + "y" * 56 + "..."  # the repr's first 57 characters, then ...


def test_format_validation_error_is_one_line_with_source_path_hint_and_count():
    exc = errors_of({"name": "n", "items": [{"beta": -1}], "epochs": 0})
    line = format_validation_error(exc, "policy.yaml")
    assert line.startswith("policy.yaml: epochs: expected a number >= 1, got 0") and "\n" not in line
    assert line.endswith(" (and 1 more)")
    assert format_validation_error(exc, None).startswith("epochs: ")
    hinted = format_validation_error(exc, "p.yaml", hint=lambda err: f"; hint for {err['loc'][0]}")
    assert hinted == "p.yaml: epochs: expected a number >= 1, got 0; hint for epochs (and 1 more)"
    nested = format_validation_error(errors_of({"name": "n", "items": [{"beta": -1}]}), "p.yaml")
    assert nested == "p.yaml: items.0.beta: expected a number >= 0.0, got -1"  # a float field: a float bound


def test_harden_nested_errors_carry_their_own_path_and_message():
    class Checked(BaseModel):
        value: int

        def model_post_init(self, _):
            if self.value > 3:
                raise PydanticCustomError("harden_nested", "{msg}", {"path": "value", "msg": "expected value <= 3"})

    class Holder(BaseModel):
        checked: Checked

    with pytest.raises(ValidationError) as info:
        Holder.model_validate({"checked": {"value": 5}})
    assert format_validation_error(info.value, "f.yaml") == "f.yaml: checked.value: expected value <= 3"
