import importlib
import json
import os

import pytest
import torch

import harden
from harden import pipeline
from harden.attacks.invariance_examples import InvarianceExamples
from harden.certify import Measurements, assemble
from harden.data import load_data
from harden.testing import TinyCNN, tiny_policy

ATTACKS = [
    {"name": "fgsm"},
    {"name": "pgd", "params": {"steps": 3}},
    {"name": "transfer", "params": {"epochs": 1, "steps": 3}},
    {"name": "invariance_examples", "params": {"pool_size": 40, "angles": 3, "shifts": 3}, "n_examples": 24},
]


def run_policy():
    return tiny_policy(
        verify={"attacks": ATTACKS, "n_examples": 48, "check_examples": 32, "check_steps": 2},
        export={"parity_examples": 8, "verify_examples": 24},
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One harden.run, with every later stage refusing to load the data again."""
    calls = []
    mp = pytest.MonkeyPatch()

    def counted(spec):
        calls.append(spec.name)
        return load_data(spec)

    def refuse(spec):
        raise AssertionError(f"the data was loaded a second time ({spec.name})")

    pools = []
    original_prepare = InvarianceExamples.prepare

    def spy(self, env):
        original_prepare(self, env)
        pools.append((self.pool, env.bundle))

    mp.setattr(InvarianceExamples, "prepare", spy)
    mp.setattr(pipeline, "load_data", counted)
    for module in ("harden.train", "harden.verify", "harden._cascade", "harden.verify_onnx", "harden.certify"):
        mp.setattr(importlib.import_module(module), "load_data", refuse)
    out = tmp_path_factory.mktemp("run")
    try:
        result = harden.run(run_policy(), out, progress=False)
    finally:
        mp.undo()
    return result, out, calls, pools


def test_run_writes_every_artefact_and_one_certificate(ran):
    result, out, _, _ = ran
    for name in ("certificate.json", "certificate.md", "certificate.html", "model.onnx", "report.json"):
        assert (out / name).is_file(), name
    cert = result.certificate
    assert result.certificate_path == out / "certificate.json"
    assert json.loads((out / "certificate.json").read_text()) == json.loads(cert.model_dump_json())
    assert cert.onnx_sha256 == result.export.sha256
    assert cert.export == result.export.to_dict()
    assert set(cert.timings) >= {"fit", "verify", "export", "total"}
    assert cert.timings["total"] >= cert.timings["fit"] + cert.timings["verify"]


def test_run_loads_the_data_once(ran):
    _, _, calls, _ = ran
    assert calls == ["synthetic"]


def test_the_onnx_session_result_is_in_the_certificate_and_its_check(ran):
    result, _, _, _ = ran
    shipped = result.certificate.onnx_black_box
    assert shipped is not None and shipped["n"] == 24 == result.onnx_report.n
    assert len(shipped["outcomes"]) == 24
    assert shipped["providers"] == result.onnx_report.onnx["providers"]
    check = result.certificate.checks["onnx_black_box"]
    held = [i for i, b in enumerate(result.report.outcomes["broken_by"][:24]) if b == ""]
    fell = [i for i in held if shipped["outcomes"][i] != ""]
    assert check["detail"].startswith(f"{len(fell)} of 24 examples")
    assert check["status"] == ("PASS" if not fell else "WARN" if len(fell) <= 0.02 * 24 else "FAIL")


def test_the_certificate_is_frozen(ran):
    result, _, _, _ = ran
    with pytest.raises(Exception, match="frozen"):
        result.certificate.verdict = "CERTIFIED"


def test_the_invariance_pool_is_the_training_split_of_the_run_bundle(ran):
    *_, pools = ran
    (pool, bundle), *_ = pools  # the verify stage's (the ONNX stage prepares its own)
    xs = torch.stack([bundle.train[i][0] for i in range(40)])
    assert pool is not None and pool[0].shape[0] == 40
    assert torch.equal(pool[0], xs)


def test_harden_verify_measures_invariance_examples_as_harden_run_does(ran):
    result, _, _, _ = ran
    policy = run_policy()
    alone = harden.verify(result.model, policy, load_data(policy.data).test, progress=False)
    label = "invariance_examples"
    assert label in result.report.other_threats
    assert alone.other_threats[label] == result.report.other_threats[label]
    assert alone.outcomes["other"][label] == result.report.outcomes["other"][label]
    assert alone.per_attack == result.report.per_attack  # the transfer surrogate is the same too


def test_the_verdict_is_computed_last_from_the_onnx_result():
    policy = tiny_policy(verify={"checks": False})
    model = TinyCNN(num_classes=3)
    data = harden.data.synthetic_tensors(20)
    report = harden.verify(model, policy, data, progress=False)
    held = [i for i, b in enumerate(report.outcomes["broken_by"]) if b == ""]
    assert held, "the test needs examples the PyTorch model held"
    fell = ["" for _ in range(report.n)]
    for i in held:
        fell[i] = "square"
    ok = assemble(model, policy, report, Measurements(), onnx_black_box={"outcomes": [""] * report.n})
    bad = assemble(model, policy, report, Measurements(), onnx_black_box={"outcomes": fell})
    assert ok.verdict == "EMPIRICAL" and ok.checks["onnx_black_box"]["status"] == "PASS"
    assert bad.verdict == "UNRELIABLE" and "onnx_black_box" in bad.verdict_reason
    assert bad.checks["onnx_black_box"]["status"] == "FAIL"


def test_run_accepts_a_policy_file_and_a_model(tmp_path, monkeypatch):
    seen = {}

    def fake_fit(model, policy, **kwargs):
        seen["model"], seen["policy"], seen["bundle"] = model, policy, kwargs["bundle"]
        raise harden.DataError("stop here")

    monkeypatch.setattr(pipeline, "fit", fake_fit)
    path = tmp_path / "p.yaml"
    path.write_text(harden.dump_policy(tiny_policy()))
    model = TinyCNN(num_classes=3)
    with pytest.raises(harden.DataError, match="stop here"):
        harden.run(path, tmp_path / "out", model=model, progress=False)
    assert seen["model"] is model and seen["policy"].checked
    assert seen["bundle"].name == "synthetic"


def test_a_policy_built_in_python_is_checked_before_running(tmp_path):
    raw = harden.Policy(objectives=[harden.policy.ObjectiveSpec(name="no_such_objective")])
    with pytest.raises(harden.PolicyError, match="no_such_objective"):
        harden.run(raw, tmp_path, progress=False)


def test_run_result_model_is_the_fitted_one(ran):
    result, _, _, _ = ran
    assert result.model is result.fit.model
    assert not result.model.training


def test_a_fresh_run_into_a_used_folder_is_refused(ran):
    _, out, _, _ = ran
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(harden.RunFolderError, match=r"expected an unused run folder .*: use --resume"):
        harden.run(run_policy(), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


def quick_policy():
    return tiny_policy(
        train={"probe_examples": 0},
        objectives=[{"name": "ce"}],
        verify={"attacks": [{"name": "fgsm"}], "n_examples": 16, "checks": False, "eps_sweep": []},
        export={"parity_examples": 8, "verify_examples": 0},
    )


def test_resume_and_overwrite_and_certificate_json_written_last(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = harden.run(quick_policy(), out, progress=False)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    weights = (out / "model.safetensors").read_bytes()
    (out / "notes.txt").write_text("mine")

    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append(os.path.relpath(dst, out))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    again = harden.run(quick_policy(), out, resume=True, progress=False)
    monkeypatch.undo()
    assert again.fit.resumed_from == 1 and again.fit.history == first.fit.history
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    assert (out / "model.safetensors").read_bytes() == weights
    assert again.certificate.onnx_sha256 == again.export.sha256
    order = [p for p in replaced if not p.startswith("checkpoints")]
    assert order[-1] == "certificate.json", order  # the commit marker, last
    assert order.index("model.safetensors") < order.index("report.json") < order.index("model.onnx")
    assert order.index("model.onnx") < order.index("certificate.md") < order.index("certificate.json")

    fresh = harden.run(quick_policy(), out, overwrite=True, progress=False)
    assert json.loads((out / "run.json").read_text())["run_id"] != run_id
    assert fresh.fit.resumed_from is None and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".harden.lock").exists() and not list(out.glob(".*.tmp"))
