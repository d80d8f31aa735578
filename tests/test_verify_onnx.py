"""harden.verify_onnx: the gradient-free attacks it picks, and its report on an ONNX session of a tiny model."""

import copy
import json

import pytest
import torch
import yaml

import harden
from harden.attacks.suite import attack_spec
from harden.cli import main
from harden.errors import ExportError, ModelError
from harden.runtime import CPU, load_onnx
from harden.testing import tiny_policy
from harden.verify_onnx import DEFAULT_SQUARE_QUERIES, gradient_free_specs, verify_onnx


def test_gradient_free_specs_add_square_and_noise_and_transfer_only_with_a_surrogate():
    policy = tiny_policy()
    assert [s.name for s in policy.verify.attacks] == ["fgsm", "pgd"]  # no gradient-free attack of its own
    plain = gradient_free_specs(policy)
    assert [s.name for s in plain] == ["square", "noise"]  # no torch model: no transfer
    assert plain[0].params["n_queries"] == DEFAULT_SQUARE_QUERIES == 1000
    assert plain[1] == attack_spec("noise")
    surrogate = gradient_free_specs(policy, with_transfer=True)
    assert [s.name for s in surrogate] == ["transfer", "square", "noise"]
    assert surrogate[0] == attack_spec("transfer") and surrogate[1:] == plain
    own = tiny_policy(verify={"attacks": [{"name": "noise", "params": {"samples": 2}}, {"name": "transfer"}]})
    for with_transfer in (False, True):  # the policy's own transfer runs either way, once
        specs = gradient_free_specs(own, with_transfer=with_transfer)
        assert [s.name for s in specs] == ["transfer", "square", "noise"]
        assert specs[2].params["samples"] == 2


def _cuda_runs(path) -> bool:
    try:
        load_onnx(path, "cuda")
    except ExportError:
        return False
    return True


def _policy(**verify):
    spec = {"attacks": [{"name": "square", "params": {"n_queries": 50}}], "n_examples": 40, **verify}
    return tiny_policy(verify=spec)


def test_gradient_free_specs_keep_the_policy_settings():
    policy = tiny_policy(
        verify={"attacks": [{"name": "pgd"}, {"name": "noise", "params": {"samples": 3}}, {"name": "square"}]}
    )
    specs = gradient_free_specs(policy)
    assert [s.name for s in specs] == ["square", "noise"]
    assert specs[0].params["n_queries"] == 5000 and specs[1].params["samples"] == 3
    standard = gradient_free_specs(tiny_policy(verify={"preset": "standard"}), with_transfer=True)
    assert [s.name for s in standard] == ["transfer", "square", "noise"]


def test_verify_onnx_report(clf, trained, data):
    report = verify_onnx(clf, _policy(), data, torch_model=trained, progress=False)
    assert isinstance(report, harden.RobustnessReport)
    assert report.n == 40
    assert list(report.per_attack) == ["transfer", "square", "noise"]
    assert report.robust_accuracy <= min(report.per_attack.values()) + 1e-12
    assert report.robust_accuracy <= report.clean_accuracy
    with torch.no_grad():
        logits = trained(data[0][:40])
    torch_right = int((logits.argmax(1) == data[1][:40]).sum())
    # clean accuracy comes from the session, whose logits match torch's within the export's parity
    # tolerance (1e-4): only rows whose top-2 torch logits are within 2e-4 (near ties) may flip
    top2 = logits.topk(2, dim=1).values
    near_ties = int(((top2[:, 0] - top2[:, 1]) <= 2e-4).sum())
    assert abs(round(report.clean_accuracy * 40) - torch_right) <= near_ties
    assert report.onnx["providers"] == [CPU] and report.onnx["path"] == str(clf.path)
    assert report.checks == {} and report.eps_curve == []
    assert "CPUExecutionProvider" in report.summary()
    json.dumps(report.to_dict())
    again = verify_onnx(clf, _policy(), data, torch_model=trained, progress=False)
    assert (again.robust_accuracy, again.per_attack) == (report.robust_accuracy, report.per_attack)  # seeded


def test_verify_onnx_refuses_a_surrogate_elsewhere(clf, trained, data):
    with pytest.raises(ModelError, match="expected torch_model on cpu"):
        verify_onnx(clf, _policy(), data, torch_model=copy.deepcopy(trained).to("meta"), progress=False)


def test_verify_onnx_warns_about_another_policy(trained, tmp_path, data):
    path = tmp_path / "with-policy.onnx"
    harden.export_onnx(trained, path, policy=tiny_policy(threat={"eps": 0.2}), input_shape=(1, 8, 8))
    with pytest.warns(UserWarning, match="exported under another policy"):
        report = verify_onnx(path, _policy(n_examples=8), data, device="cpu", progress=False)
    assert list(report.per_attack) == ["square", "noise"]  # no torch model: no transfer


# ---------------------------------------------------------------- CLI
def test_cli_verify_onnx_writes_report(tmp_path, capsys):
    policy = _policy(n_examples=32)
    policy = policy.model_copy(update={"objectives": tiny_policy(objectives=[{"name": "ce"}]).objectives})
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(yaml.safe_dump(policy.model_dump(mode="json")))
    out = tmp_path / "run"
    assert main(["fit", str(policy_file), "--out", str(out), "-q"]) == 0
    from harden.train import load_trained

    model, _ = load_trained(policy, out / "model.safetensors")
    harden.export_onnx(model, out / "model.onnx", policy=policy, input_shape=(1, 8, 8))
    capsys.readouterr()
    assert main(["verify", str(policy_file), "--out", str(out), "--onnx", str(out / "model.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "CPUExecutionProvider" in printed and "robust accuracy" in printed
    report = json.loads((out / "report-onnx.json").read_text())
    assert report["n"] == 32 and 0 <= report["robust_accuracy"] <= report["clean_accuracy"] <= 1
    assert list(report["per_attack"]) == ["transfer", "square", "noise"]
    assert report["onnx"]["providers"] == [CPU]
    assert not (out / "report.json").exists()  # the PyTorch report is another command
    if not _cuda_runs(out / "model.onnx"):
        code = main(
            ["verify", str(policy_file), "--out", str(out), "--onnx", str(out / "model.onnx"), "--onnx-device", "cuda"]
        )
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("harden: error: expected onnxruntime to run model.onnx on CUDA")


def test_the_session_is_verified_on_the_same_sample_as_verify(tmp_path):
    """verify.sample applies to the session too: class-sorted data gives every class, as harden.verify draws it."""
    model = harden.testing.TinyCNN(num_classes=3)
    path = tmp_path / "tiny.onnx"
    harden.export_onnx(model, path, input_shape=(1, 8, 8))
    x, y = harden.testing.synthetic_tensors(60)
    order = torch.argsort(y, stable=True)  # class-sorted: the first 12 are one class
    data = (x[order], y[order])
    policy = tiny_policy(verify={"n_examples": 12, "attacks": [{"name": "noise", "params": {"samples": 1}}]})
    rep = verify_onnx(path, policy, data, device="cpu", progress=False)
    picked = data[1][rep.outcomes["indices"]]
    assert len(picked) == 12 and sorted(torch.bincount(picked, minlength=3).tolist()) == [4, 4, 4]
    first = tiny_policy(
        verify={"n_examples": 12, "sample": "first", "attacks": [{"name": "noise", "params": {"samples": 1}}]}
    )
    assert verify_onnx(path, first, data, device="cpu", progress=False).outcomes["indices"] == list(range(12))
