"""harden.integrity (`harden inspect`): re-hashing the files a certificate vouches for."""

from pathlib import Path

import pytest
import torch
import yaml

import harden
from harden.checkpoint import state_bytes
from harden.cli import main
from harden.integrity import inspect_certificate
from harden.models import prepare_model
from harden.policy_io import dump_policy
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    policy = tmp / "p.yaml"
    policy.write_text(yaml.safe_dump(tiny_policy(train={"epochs": 1}).model_dump(mode="json")))
    out = tmp / "run"
    assert main(["run", str(policy), "--out", str(out), "-q"]) == 0
    return out


def _copy(run_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("certificate.json", "model.safetensors", "model.onnx", "policy.yaml"):
        (dest / name).write_bytes((run_dir / name).read_bytes())
    return dest


def test_inspect_passes_on_an_untouched_run(run_dir, capsys):
    cert, checks = inspect_certificate(run_dir / "certificate.json")
    assert [(c.item, c.status) for c in checks] == [("weights", "OK"), ("onnx", "OK"), ("policy", "OK")]
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert cert.verdict in out and "MISMATCH" not in out


def test_inspect_catches_a_modified_onnx(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path / "t")
    blob = bytearray((d / "model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(blob))
    assert main(["inspect", str(d / "certificate.json")]) == 1
    captured = capsys.readouterr()
    assert "model.onnx (mismatch)" in captured.err
    assert "weights  OK" in captured.out


def test_inspect_catches_a_changed_policy_and_missing_weights(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path / "t")
    doc = yaml.safe_load((d / "policy.yaml").read_text())
    doc["threat"]["eps"] = doc["threat"]["eps"] / 2  # a weaker threat model than certified
    (d / "policy.yaml").write_text(yaml.safe_dump(doc))
    (d / "model.safetensors").unlink()
    assert main(["inspect", str(d)]) == 1
    err = capsys.readouterr().err
    assert "policy.yaml (mismatch)" in err and "model.safetensors (missing)" in err


def test_inspect_refuses_a_non_certificate(tmp_path):
    (tmp_path / "certificate.json").write_text('{"verdict": "CERTIFIED"}')
    with pytest.raises(harden.HardenError, match="valid certificate"):
        inspect_certificate(tmp_path)
    with pytest.raises(harden.HardenError, match="no file"):
        inspect_certificate(tmp_path / "nothing")


@pytest.fixture(scope="module")
def certified():
    """The certificate of an untrained TinyCNN (no files written), the model as certified, and the policy."""
    torch.manual_seed(0)
    model, policy = TinyCNN(num_classes=3), tiny_policy(verify={"checks": False, "eps_sweep": []})
    cert = harden.certify(model, policy, synthetic_tensors(8), progress=False)
    return cert, prepare_model(model, policy.model), policy


@pytest.fixture
def lone_certificate(certified, tmp_path):
    """``certified``, with its certificate saved alone in tmp_path."""
    certified[0].save(tmp_path)
    return certified


def test_each_status_of_the_checks(lone_certificate, tmp_path):
    cert, net, policy = lone_certificate
    _, checks = inspect_certificate(tmp_path)
    assert [(c.item, c.status, c.ok) for c in checks] == [
        ("weights", "MISSING", False),
        ("onnx", "UNRECORDED", True),  # not exported: nothing to check
        ("policy", "MISSING", False),
    ]
    assert [c.path.name for c in checks] == ["model.safetensors", "model.onnx", "policy.yaml"]
    (tmp_path / "model.safetensors").write_bytes(state_bytes(net))
    (tmp_path / "policy.yaml").write_text(dump_policy(policy))
    _, checks = inspect_certificate(tmp_path / "certificate.json")
    weights, onnx_check, policy_check = checks
    assert (weights.status, weights.expected, weights.actual) == ("OK", cert.weights_sha256, cert.weights_sha256)
    assert (policy_check.status, policy_check.actual) == ("OK", cert.policy_sha256)
    assert onnx_check.status == "UNRECORDED" and onnx_check.expected is None


def test_a_policy_edited_into_invalidity_is_a_mismatch(lone_certificate, tmp_path):
    (tmp_path / "policy.yaml").write_text("objectives: 3\n")
    _, checks = inspect_certificate(tmp_path)
    policy_check = checks[2]
    assert policy_check.status == "MISMATCH" and not policy_check.ok
    assert policy_check.actual is None and "policy.yaml no longer loads" in policy_check.detail


def test_other_weights_are_a_mismatch(lone_certificate, tmp_path):
    cert, _, _ = lone_certificate
    torch.manual_seed(1)
    other = prepare_model(TinyCNN(num_classes=3), lone_certificate[2].model)
    (tmp_path / "model.safetensors").write_bytes(state_bytes(other))
    weights = inspect_certificate(tmp_path)[1][0]
    assert weights.status == "MISMATCH" and weights.actual not in (None, cert.weights_sha256)
    assert "differs from the certified file" in weights.detail
