"""harden.consistency: the rules inspect re-applies to a certificate, each one able to fail."""

import pytest

import harden
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
