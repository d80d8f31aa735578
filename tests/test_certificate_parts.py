"""harden.certificate_parts: the records a certificate nests, the requirements and the verdict rule."""

import pydantic
import pytest

import harden.certificate
from harden.certificate_parts import (
    RequirementResult,
    SmoothingSummary,
    requirement_results,
    requirement_values,
    verdict_rule,
)


def test_verdict_rule_is_the_documented_rule():
    def smoothing(**kw):
        base = {
            "sigma": 0.25, "n0": 8, "n": 32, "alpha": 0.001, "examples": 4, "abstentions": 0, "radius": 0.5,
            "certified_accuracy": 0.5, "min_certified_accuracy": 0.5, "curve": [], "labels": [], "predictions": [],
            "radii": [], "seconds": 1.0, "samples_per_second": 1.0,
        }  # fmt: skip
        return SmoothingSummary(**{**base, **kw})

    passed = {"a": {"status": "PASS"}, "b": {"status": "WARN"}}
    assert verdict_rule(passed, None)[0] == "EMPIRICAL"
    assert verdict_rule(passed, smoothing()) == (
        "CERTIFIED",
        "smoothed classifier (sigma=0.25) certified on 50.0% of 4 examples at l2 radius 0.5 (alpha=0.001)",
    )
    assert verdict_rule(passed, smoothing(certified_accuracy=0.25))[0] == "EMPIRICAL"
    assert verdict_rule(passed, smoothing(certified_accuracy=None))[0] == "EMPIRICAL"
    assert "certify.radius is not set" in verdict_rule(passed, smoothing(radius=None))[1]
    failed = {**passed, "c": {"status": "FAIL"}, "d": {"status": "FAIL"}}
    assert verdict_rule(failed, smoothing()) == ("UNRELIABLE", "sanity check(s) failed: c, d")
    assert verdict_rule({"odd": {"detail": "no status"}, "x": "not a mapping"}, None)[0] == "EMPIRICAL"


def test_a_skipped_check_is_named_in_the_reason_and_never_a_failure():
    skipped = {"a": {"status": "PASS"}, "white_box_beats_black_box": {"status": "SKIP"}}
    decided, reason = verdict_rule(skipped, None)
    assert decided == "EMPIRICAL" and reason.endswith("; not tested (SKIP, N/A): white_box_beats_black_box")
    assert verdict_rule({**skipped, "b": {"status": "FAIL"}}, None) == ("UNRELIABLE", "sanity check(s) failed: b")
    assert "SKIP" not in verdict_rule({"a": {"status": "PASS"}}, None)[1]


def test_harden_certificate_exports_the_same_objects():
    assert harden.certificate.verdict_rule is verdict_rule
    assert harden.certificate.SmoothingSummary is SmoothingSummary
    assert harden.certificate.RequirementResult is RequirementResult


def test_a_requirement_the_certificate_did_not_measure_fails_and_a_record_is_frozen():
    values = requirement_values(0.9, 0.5, {"pgd": 0.5}, None)
    (result,) = requirement_results(["certified_accuracy >= 10%"], values)
    assert result.actual is None and result.passed is False
    with pytest.raises(pydantic.ValidationError):
        result.passed = True  # type: ignore[misc]
