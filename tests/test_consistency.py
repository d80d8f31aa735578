"""harden.consistency: the rules inspect re-applies to a certificate, each one able to fail."""

import pytest

import harden
import harden.certificate
from harden.certificate import FIELDS_SINCE_2_3, FIELDS_SINCE_2_4, Certificate, ClassResult
from harden.consistency import consistency_problems
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy


@pytest.fixture(scope="module")
def cert():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    policy = tiny_policy(verify={"checks": False})
    return harden.certify(TinyCNN(num_classes=3), policy, synthetic_tensors(16), progress=False)


def failing(cert, **update):
    return {item for item, problems in consistency_problems(cert.model_copy(update=update)) if problems}


def test_an_honest_certificate_is_consistent(cert):
    assert [item for item, problems in consistency_problems(cert) if problems] == []
    assert [item for item, _ in consistency_problems(cert)] == [
        "schema", "verdict", "accuracy", "intervals", "broken_by", "checks", "smoothing", "export",
        "requirements", "baseline",
    ]  # fmt: skip


def test_each_rule_catches_its_forgery(cert):
    assert failing(cert, schema_version="2.1") == {"schema"}
    assert failing(cert, verdict="CERTIFIED") == {"verdict"}
    assert "accuracy" in failing(cert, robust_accuracy=min(1.0, cert.clean_accuracy + 1 / cert.n))
    assert "accuracy" in failing(cert, clean_accuracy=0.5 + 0.5 / (4 * cert.n))  # not a whole count of n
    assert "intervals" in failing(cert, intervals={k: (0.0, 0.01) for k in cert.intervals})
    assert "broken_by" in failing(cert, broken_by={"no_such_attack": 1})
    assert "checks" in failing(cert, checks={"x": {"status": "MAYBE"}})
    assert "export" in failing(cert, export={"sha256": "0" * 64}, onnx_sha256="1" * 64)


@pytest.fixture(scope="module")
def full(cert):
    """``cert`` with 2.3's parts: targets, a baseline (the same model), per-class counts, the check subset."""
    from harden.certify import assemble
    from harden.measure import Measurements
    from harden.verify import verify

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3)
    policy = tiny_policy(
        verify={"checks": False, "eps_sweep": [0.05, 0.1]}, certify={"require": ["clean_accuracy >= 0"]}
    )
    data = synthetic_tensors(16)
    report = verify(model, policy, data, progress=False)
    made = assemble(model, policy, report, Measurements(), baseline_report=report)
    clean, robust = round(made.clean_accuracy * made.n), round(made.robust_accuracy * made.n)
    rows = [{"label": 0, "name": "a", "n": made.n - 1, "clean": clean, "robust": robust}]
    rows.append({"label": 1, "name": None, "n": 1, "clean": 0, "robust": 0})
    return made.model_copy(update={"per_class": [ClassResult.model_validate(r) for r in rows]})


def test_the_2_3_parts_are_consistent_and_each_forgery_is_caught(full):
    assert full.requirements and full.baseline is not None and full.eps_intervals and full.check_n
    assert [item for item, problems in consistency_problems(full) if problems] == []
    req = full.requirements[0]
    assert failing(full, requirements=[req.model_copy(update={"passed": False})]) == {"requirements"}
    assert failing(full, requirements=[req.model_copy(update={"actual": 0.99})]) == {"requirements"}
    assert failing(full, requirements=[req.model_copy(update={"value": 0.5})]) == {"requirements"}
    assert failing(full, requirements=[req.model_copy(update={"text": "robust_acc >= 0"})]) == {"requirements"}
    rows = full.per_class
    assert "accuracy" in failing(full, per_class=[rows[0].model_copy(update={"clean": rows[0].clean + 1}), rows[1]])
    assert "accuracy" in failing(full, per_class=[rows[0], rows[0]])  # a label twice
    assert "accuracy" in failing(full, check_n=full.n + 1)
    assert "accuracy" in failing(full, check_clean_accuracy=0.5 / full.check_n)
    wrong = [(0.0, 0.01)] * len(full.eps_intervals)
    assert failing(full, eps_intervals=wrong) == {"intervals"}
    assert failing(full, eps_intervals=full.eps_intervals[:1]) == {"intervals"}
    b = full.baseline
    assert failing(full, baseline=b.model_copy(update={"robust_accuracy": 1.0})) == {"baseline"}
    assert failing(full, baseline=b.model_copy(update={"n": b.n + 1})) == {"baseline"}
    assert failing(full, baseline=b.model_copy(update={"intervals": {}})) == {"baseline"}
    assert failing(full, baseline=b.model_copy(update={"eps_intervals": wrong})) == {"baseline"}


def test_schema_2_2_is_accepted_without_2_3_fields(cert, full):
    fields = Certificate.model_fields
    old = {f: fields[f].get_default(call_default_factory=True) for f in FIELDS_SINCE_2_3 + FIELDS_SINCE_2_4}
    assert failing(cert, schema_version="2.2", **old) == set()  # a 2.2 certificate has nothing of 2.3
    assert failing(cert, schema_version="2.2", **{**old, "check_n": cert.check_n}) == {"schema"}
    assert failing(full, schema_version="2.2") == {"schema"}  # 2.3 fields under a 2.2 label
    assert failing(cert, schema_version="9.9") == {"schema"}


def test_a_skip_is_a_known_status_and_never_a_failure(cert):
    skipped = {"white_box_beats_black_box": {"id": "white_box_beats_black_box", "status": "SKIP"}}
    decided, reason = harden.certificate.verdict_rule(skipped, cert.smoothing)
    assert "checks" not in failing(cert, checks=skipped, verdict=decided, verdict_reason=reason)
    assert decided == "EMPIRICAL" and "not tested (SKIP, N/A)" in reason
    assert "verdict" in failing(cert, checks=skipped)  # the reason must say what was not tested


def test_schema_2_3_is_accepted_without_the_verify_times(cert):
    assert cert.verify_seconds and cert.schema_version == "2.4"  # certify records them
    fields = Certificate.model_fields
    old = {f: fields[f].get_default(call_default_factory=True) for f in FIELDS_SINCE_2_4}
    assert failing(cert, schema_version="2.3", **old) == set()
    assert failing(cert, schema_version="2.3") == {"schema"}  # 2.4 fields under a 2.3 label


def test_check_costs_belong_to_recorded_checks_and_fit_in_the_checks_time(cert):
    record = {"id": "a", "status": "PASS", "detail": "", "raised_if": "", "remedy": ""}
    times = {**cert.verify_seconds, "checks": 1.0}
    fine = {"checks": {"a": record}, "verify_seconds": times, "per_check_seconds": {"a": 1.0}}
    decided, reason = harden.certificate.verdict_rule(fine["checks"], cert.smoothing)
    fine |= {"verdict": decided, "verdict_reason": reason}
    assert failing(cert, **fine) == set()
    assert failing(cert, **{**fine, "per_check_seconds": {"b": 0.5}}) == {"checks"}  # no such check
    assert failing(cert, **{**fine, "per_check_seconds": {"a": 1.5}}) == {"checks"}  # more than the checks took
