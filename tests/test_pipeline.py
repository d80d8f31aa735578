import importlib
import json
import os
from types import SimpleNamespace

import pytest
import torch

import harden
from harden import pipeline
from harden.attacks.invariance_examples import InvarianceExamples
from harden.certify import assemble
from harden.data import load_data
from harden.measure import Measurements
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
        result = harden.run(run_policy(), out, progress=False, say=SAID.append)
    finally:
        mp.undo()
    return result, out, calls, pools


#: what the fixture's run said, in order
SAID: list[str] = []


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


def test_run_says_its_plan_first_then_each_stage_as_it_finishes(ran):
    result, _, _, _ = ran
    heads = [line.split()[0] for line in SAID]
    assert heads[:2] == ["plan", "train"]  # the plan, before training
    plan_end = heads.index("time")  # the estimate ends the plan: the pass was measured
    assert "estimate" in SAID[plan_end]
    stages = [
        next(i for i, line in enumerate(SAID) if line.startswith(head))
        for head in ("trained 1 epoch(s)", "clean accuracy   ", "exported ", "the exported ONNX session", "wrote ")
    ]
    assert plan_end < stages[0] and stages == sorted(stages), SAID
    assert f"robust accuracy {result.certificate.robust_accuracy:.2%}" in SAID[-1]
    assert SAID[-1].endswith(f"verdict {result.certificate.verdict}")
    assert "attacked on 24 examples" in "\n".join(SAID[:plan_end])  # export.verify_examples of the policy


def test_the_plan_of_a_run_times_one_pass_without_touching_the_run(tmp_path):
    from harden.data import synthetic_bundle

    torch.manual_seed(3)
    model = TinyCNN(num_classes=3)
    state = torch.random.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = pipeline.plan_run(tiny_policy(), synthetic_bundle(), model)
    assert plan.seconds_per_pass is not None and plan.seconds_per_pass > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    broken = pipeline.plan_run(tiny_policy(), synthetic_bundle(), torch.nn.Linear(3, 3))  # cannot take the images
    assert broken.seconds_per_pass is None and not any(line.startswith("time") for line in broken.lines())


def test_fit_summary_counts_the_epochs_trained_and_names_early_stopping_and_the_best_epoch():
    from harden.pipeline import fit_summary
    from harden.testing import tiny_policy

    # exact binary fractions: each percentage prints exactly
    history = [
        {"epoch": e, "val_clean_acc": c, "val_pgd_acc": r}
        for e, c, r in [(1, 0.5, 0.25), (2, 0.75, 0.5), (3, 0.625, 0.375), (4, 0.875, 0.125)]
    ]

    def result(**changes):
        base = {"resumed_from": None, "seconds": 1.0, "weights": "w", "best_epoch": 2, "stopped_early": True}
        return SimpleNamespace(**(base | {"history": history} | changes))

    best = tiny_policy(train={"epochs": 10, "early_stopping": 2, "select": "best"})
    stopped = "stopped early after epoch 4: the probe's robust accuracy did not improve for 2 epochs"
    assert fit_summary(best, result()) == [
        "trained 4 epoch(s) in 1.0 s -> w",  # 4 of train.epochs=10: early stopping ended it
        stopped,
        "best probe epoch 2",
        "validation (best epoch 2): clean 75.00%, PGD-3 probe 50.00%",  # the selected epoch's, not the last
    ]
    last = tiny_policy(train={"epochs": 10, "early_stopping": 2})
    assert fit_summary(last, result(resumed_from=3)) == [
        "resumed from the checkpoint of epoch 3",
        "trained 1 epoch(s) in 1.0 s -> w",
        stopped,
        "best probe epoch 2",
        "validation: clean 87.50%, PGD-3 probe 12.50%",
    ]
    assert fit_summary(last, result(resumed_from=4))[1] == "trained no epoch: the checkpoint already holds all 4 -> w"
    no_probe = [{"epoch": e} for e in (1, 2, 3)]
    assert fit_summary(tiny_policy(train={"epochs": 3}), result(history=no_probe, best_epoch=None, stopped_early=False)) == [
        "trained 3 epoch(s) in 1.0 s -> w"
    ]


def test_a_run_with_a_baseline_puts_it_beside_the_hardened_model(tmp_path):
    from safetensors.torch import save_file

    from harden.errors import ModelError

    policy = tiny_policy(verify={"checks": False}, export={"verify_examples": 0})
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelError, match="baseline's weights file"):
        harden.run(policy, tmp_path / "never", progress=False, baseline=missing)
    assert not (tmp_path / "never").exists()  # refused before the folder opened or anything trained
    torch.manual_seed(0)
    undefended = TinyCNN(num_classes=3)
    weights = tmp_path / "base.safetensors"
    save_file(undefended.state_dict(), str(weights))  # a plain state_dict of the policy's architecture
    said: list[str] = []
    result = harden.run(policy, tmp_path / "r", progress=False, baseline=weights, say=said.append)
    cert = result.certificate
    alone = harden.certify(undefended.eval(), policy, baseline=undefended, progress=False).baseline
    assert cert.baseline is not None and cert.baseline.n == cert.n
    same = (cert.baseline.clean_accuracy, cert.baseline.robust_accuracy)
    assert same == (alone.clean_accuracy, alone.robust_accuracy)  # the same suite, examples and seed
    assert any(line.startswith("undefended baseline: clean") for line in said)
