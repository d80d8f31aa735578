"""harden.require: targets read from text, one-line errors, and how a measured value meets them."""

import ast
from pathlib import Path

import pydantic
import pytest

import harden.require
from harden.errors import PolicyError, format_validation_error
from harden.policy_io import validate_policy
from harden.require import Requirement, format_fraction, parse_requirement
from harden.schema import CertifySpec


@pytest.mark.parametrize(
    ("text", "metric", "op", "value"),
    [
        ("robust_accuracy >= 0.45", "robust_accuracy", ">=", 0.45),
        ("robust_accuracy>=45%", "robust_accuracy", ">=", 0.45),
        ("  clean_accuracy > 90%  ", "clean_accuracy", ">", 0.9),
        ("certified_accuracy <= 1", "certified_accuracy", "<=", 1.0),
        ("clean_accuracy < 0", "clean_accuracy", "<", 0.0),
        ("after:apgd_ce >= 50%", "after:apgd_ce", ">=", 0.5),
        ("accuracy_after:pgd#2 > 0.1", "after:pgd#2", ">", 0.1),  # the contract's spelling, same metric
    ],
)
def test_parse_reads_metric_operator_and_value(text, metric, op, value):
    req = parse_requirement(text)
    assert (req.metric, req.op) == (metric, op)
    assert req.value == pytest.approx(value, abs=1e-15)  # 45/100 and 0.45 are one float apart at most
    again = parse_requirement(req.text)  # the canonical text reads back to the same requirement
    assert (again.metric, again.op) == (metric, op) and abs(again.value - req.value) <= 1e-12
    assert isinstance(req, Requirement)


def test_canonical_text_is_a_percentage():
    assert parse_requirement("robust_accuracy >= 0.45").text == "robust_accuracy >= 45%"
    assert parse_requirement("after:pgd>0.455").text == "after:pgd > 45.5%"
    assert format_fraction(0.04) == "4%" and format_fraction(1.0) == "100%"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("robust_accuracy >= 45", "(write 45% for a percentage)"),
        ("robust_accuracy >= 1.5", "expected a value in [0, 1] or [0%, 100%], got '1.5'"),
        ("robust_accuracy >= 120%", "got '120%'"),
        ("robust_accuracy >= -0.1", "got '-0.1'"),
        ("robust_accuracy >= high", "expected a number (0.45) or a percentage (45%)"),
        ("robust_accuracy >= nan", "expected a number"),
        ("robust_accuracy >= inf%", "expected a number"),
        ("robust_acc >= 0.4", "expected a metric among clean_accuracy, robust_accuracy, certified_accuracy"),
        ("after: >= 0.4", "expected an attack label after 'after:'"),
        ("after:>=0.4", "expected an attack label after 'after:'"),
        ("robust_accuracy = 0.4", "expected 'METRIC OP VALUE' with OP one of >=, >, <=, <"),
        ("robust_accuracy => 0.4", "expected 'METRIC OP VALUE'"),
        ("robust_accuracy >= 0.4 and more", "expected 'METRIC OP VALUE'"),
        ("", "expected 'METRIC OP VALUE'"),
        ("x" * 10_000, "..."),  # long text is cut in the message, never echoed whole
    ],
)
def test_parse_errors_are_one_line_expected_got(text, words):
    with pytest.raises(PolicyError) as info:
        parse_requirement(text)
    msg = str(info.value)
    assert words in msg and "\n" not in msg and len(msg) < 400, msg
    assert msg.startswith("expected ")


def test_parse_refuses_what_is_not_text():
    with pytest.raises(PolicyError, match="expected a requirement as text"):
        parse_requirement(0.45)  # type: ignore[arg-type]


def test_check_needs_a_measured_value_meeting_the_target():
    at_least = parse_requirement("robust_accuracy >= 45%")
    assert at_least.check({"robust_accuracy": 0.45}) and not at_least.check({"robust_accuracy": 0.04})
    assert not at_least.check({}) and at_least.actual({}) is None  # not measured: fails
    assert not at_least.check({"robust_accuracy": None})
    assert not at_least.check({"robust_accuracy": float("nan")})
    strictly = parse_requirement("clean_accuracy > 0.5")
    assert not strictly.check({"clean_accuracy": 0.5}) and strictly.check({"clean_accuracy": 0.51})
    below = parse_requirement("after:pgd < 10%")
    assert below.check({"after:pgd": 0.05}) and not below.check({"after:pgd": 0.1})
    assert parse_requirement("after:pgd <= 10%").check({"after:pgd": 0.1})


def test_certify_require_is_validated_with_the_key_path():
    assert CertifySpec(require=["robust_accuracy >= 0.45"]).require == ("robust_accuracy >= 0.45",)
    assert CertifySpec().require == ()
    for bad, words in (
        (["robust_accuracy >= 45"], "certify.require.0: expected a value in [0, 1]"),
        (["clean_accuracy > 0.5", "x"], "certify.require.1: expected 'METRIC OP VALUE'"),
        ("robust_accuracy >= 0.4", "certify.require: expected a list"),  # one string is not a list
        ([0.45], "certify.require.0: expected a string"),
    ):
        with pytest.raises(PolicyError) as info:
            validate_policy({"objectives": [{"name": "ce"}], "certify": {"require": bad}}, source="p.yaml")
        text = str(info.value)
        assert text.startswith("p.yaml: ") and words in text and "\n" not in text, text
    with pytest.raises(pydantic.ValidationError) as raw:  # the spec alone names its own key
        CertifySpec.model_validate({"require": ["x"]})
    assert format_validation_error(raw.value, None).startswith("require.0: expected 'METRIC OP VALUE'")


def test_require_imports_nothing_of_harden_but_its_errors():
    tree = ast.parse(Path(harden.require.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m and m.startswith("harden")} == {"harden.errors"}
