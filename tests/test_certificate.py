import json

import pydantic
import pytest

from harden.certificate import CERTIFICATE_SCHEMA_VERSION, Certificate, environment


def tiny_cert(**updates):
    fields = {
        "verdict": "EMPIRICAL",
        "verdict_reason": "attack suite only",
        "created": "2026-01-01T00:00:00+00:00",
        "policy_name": "p",
        "policy_sha256": "0" * 64,
        "weights_sha256": "1" * 64,
        "threat": {"norm": "linf", "eps": 0.1},
        "n": 10,
        "clean_accuracy": 0.9,
        "robust_accuracy": 0.5,
        "per_attack": {"pgd": 0.5},
        "attacks": [{"name": "pgd"}],
        "seed": 0,
        "device": "cpu",
        "versions": {"harden": "0"},
    }
    return Certificate(**{**fields, **updates})


def test_a_certificate_cannot_be_edited_after_assembly():
    cert = tiny_cert()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cert.verdict = "CERTIFIED"
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cert.onnx_sha256 = "2" * 64


def test_save_and_load_round_trip(tmp_path):
    cert = tiny_cert()
    path = cert.save(tmp_path)
    assert path == tmp_path / "certificate.json"
    assert {p.name for p in tmp_path.iterdir()} == {"certificate.json", "certificate.md", "certificate.html"}
    assert Certificate.load(path) == cert
    assert json.loads(path.read_text())["schema_version"] == CERTIFICATE_SCHEMA_VERSION
    only_json = tmp_path / "j"
    only_json.mkdir()
    cert.save(only_json, formats=("json",))
    assert [p.name for p in only_json.iterdir()] == ["certificate.json"]


def test_schema_refuses_unknown_keys_and_impossible_accuracies():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        tiny_cert(surprise=1)
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(robust_accuracy=1.5)
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(verdict="PROBABLY_FINE")
    schema = Certificate.json_schema()
    assert "verdict" in schema["required"] and schema["additionalProperties"] is False


def test_environment_names_python_harden_and_torch():
    env = environment()
    assert {"python", "harden", "platform", "torch"} <= set(env)
    assert all(isinstance(v, str) and v for v in env.values())


def test_the_nested_records_are_frozen_too():
    from harden.certificate import SaliencyExample

    ex = SaliencyExample(label=0, prediction=0, image=[[[0.0]]], maps={})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        ex.label = 1
