"""verify, certify and export_onnx on tiny models."""

import contextlib
import copy
import hashlib
import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.attacks.base import save_modes
from harden.certify import Certificate
from harden.models import Normalized
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy


def fast_policy(**updates):
    """tiny_policy with the attack suite only: no sanity checks, no eps sweep (tested elsewhere)."""
    verify = {"checks": False, "eps_sweep": [], **updates.pop("verify", {})}
    return tiny_policy(verify=verify, **updates)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short training run shared by the verify/certify tests."""
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    policy = fast_policy(train={"epochs": 2}, objectives=[{"name": "ce"}])
    torch.manual_seed(0)
    result = harden.fit(None, policy, run_dir=run_dir, progress=False)
    return policy, result


def report_key(report):
    return (
        report.n,
        report.clean_accuracy,
        report.robust_accuracy,
        report.per_attack,
        report.broken_by,
        report.threat,
        report.attacks,
    )


def test_verify_same_report_for_tuple_dataset_and_loader(fitted):
    policy, result = fitted
    x, y = synthetic_tensors(80, seed=5)
    from_tuple = harden.verify(result.model, policy, (x, y), progress=False)
    from_dataset = harden.verify(result.model, policy, TensorDataset(x, y), progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=policy.data.eval_batch_size, shuffle=False)
    from_loader = harden.verify(result.model, policy, loader, progress=False)
    assert report_key(from_tuple) == report_key(from_dataset) == report_key(from_loader)
    assert from_tuple.n == 80


def test_verify_report_contents(fitted):
    policy, result = fitted
    report = harden.verify(result.model, policy, synthetic_tensors(90, seed=5), progress=False)
    assert isinstance(report, harden.RobustnessReport)
    assert report.n == 90
    assert report.clean_accuracy > 0.6
    assert report.robust_accuracy <= report.clean_accuracy
    assert report.robust_accuracy < report.clean_accuracy  # an undefended model loses to PGD
    assert list(report.per_attack) == ["fgsm", "pgd"]
    assert list(report.broken_by) == ["clean", "fgsm", "pgd"]
    accs = [report.clean_accuracy, *report.per_attack.values()]
    assert all(b <= a for a, b in itertools.pairwise(accs))
    assert report.per_attack["pgd"] == report.robust_accuracy
    assert sum(report.broken_by.values()) == round(report.n * (1 - report.robust_accuracy))
    assert report.broken_by["clean"] == round(report.n * (1 - report.clean_accuracy))
    assert set(report.attack_seconds) == {"fgsm", "pgd"}
    assert report.threat == {"norm": "linf", "eps": 0.1, "rho": None}
    assert json.loads(json.dumps(report.to_dict()))["n"] == 90
    assert "robust accuracy" in report.summary()


def test_verify_is_seeded_and_leaves_global_rng_alone(fitted):
    policy, result = fitted
    data = synthetic_tensors(40, seed=6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = harden.verify(result.model, policy, data, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = harden.verify(result.model, policy, data, progress=False)
    assert report_key(a) == report_key(b)


def test_verify_limits_to_n_examples():
    policy = fast_policy(verify={"n_examples": 10})
    report = harden.verify(TinyCNN(num_classes=3), policy, synthetic_tensors(50), progress=False)
    assert report.n == 10


def test_verify_restores_modes():
    model = TinyCNN(num_classes=3).train()
    model.features[1].eval()
    before = save_modes(model)
    harden.verify(model, fast_policy(), synthetic_tensors(16), progress=False)
    assert save_modes(model) == before


def test_verify_refuses_bad_pixels():
    x, y = synthetic_tensors(8)
    with pytest.raises(harden.DataError):
        harden.verify(TinyCNN(num_classes=3), fast_policy(), (x * 255, y), progress=False)


def test_certify_hashes_the_fitted_weights(fitted, tmp_path):
    policy, result = fitted
    cert = harden.certify(result.model, policy, synthetic_tensors(40, seed=5), history=result.history, progress=False)
    assert isinstance(cert, Certificate)
    assert cert.verdict == "EMPIRICAL"
    assert cert.weights_sha256 == hashlib.sha256(result.weights.read_bytes()).hexdigest()
    assert cert.policy_sha256 == harden.policy_hash(policy)
    assert cert.n == 40
    assert cert.robust_accuracy <= cert.clean_accuracy
    assert cert.training == result.history
    assert cert.device == "cpu"
    assert cert.versions["harden"] == harden.__version__
    assert "torch" in cert.versions
    path = cert.save(tmp_path / "out")
    assert path == tmp_path / "out" / "certificate.json"
    assert Certificate.load(path) == cert
    assert "verdict" in Certificate.json_schema()["properties"]


def test_certify_reuses_a_report(fitted):
    policy, result = fitted
    report = harden.verify(result.model, policy, synthetic_tensors(30, seed=5), progress=False)
    cert = harden.certify(result.model, policy, report=report, timings={"fit": 1.5}, progress=False)
    assert (cert.n, cert.clean_accuracy, cert.robust_accuracy) == (
        report.n,
        report.clean_accuracy,
        report.robust_accuracy,
    )
    assert cert.timings == {"fit": 1.5, "verify": report.seconds}


def test_certificate_refuses_unknown_fields(tmp_path):
    cert = harden.certify(TinyCNN(num_classes=3), fast_policy(), synthetic_tensors(8), progress=False)
    data = json.loads(cert.model_dump_json())
    data["surprise"] = 1
    (tmp_path / "certificate.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="surprise"):
        Certificate.load(tmp_path / "certificate.json")


# --------------------------------------------------------------------------- ONNX


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"pixels": x.numpy()})[0]


def check_export(model, path, shape, num_classes, policy=None):
    torch.manual_seed(0)
    before = save_modes(model)
    result = harden.export_onnx(model, path, policy=policy, input_shape=shape)
    assert save_modes(model) == before  # the caller's (train) modes are untouched
    assert result.path == path and path.is_file()
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["harden_version"] == harden.__version__
    assert "mean" in meta and "std" in meta
    assert result.metadata == meta
    assert result.parity_max_abs_diff <= 1e-4
    assert result.parity_argmax_agreement == 1.0
    assert "CPUExecutionProvider" in result.providers
    assert result.exporter in ("dynamo", "torchscript")
    assert result.opset >= 13
    reference = copy.deepcopy(model).eval()
    for batch in (1, 7):  # dynamic batch axis
        x = torch.rand(batch, *shape)
        got = run_onnx(path, x)
        assert got.shape == (batch, num_classes)
        with torch.no_grad():
            want = reference(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    return result, meta


def test_export_tinycnn_with_policy(tmp_path):
    torch.manual_seed(0)
    model = Normalized(TinyCNN(num_classes=3), (0.5,), (0.25,)).train()
    policy = tiny_policy()
    result, meta = check_export(model, tmp_path / "tiny.onnx", (1, 8, 8), 3, policy=policy)
    assert meta["policy_hash"] == harden.policy_hash(policy)
    assert json.loads(meta["mean"]) == [0.5]
    assert json.loads(meta["std"]) == [0.25]
    assert json.loads(meta["threat_model"])["eps"] == 0.1
    assert result.parity_examples == policy.export.parity_examples
    assert model.training and model.model.features[1].training


def test_export_timm_resnet10t(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1).train()
    _result, meta = check_export(model, tmp_path / "resnet.onnx", (1, 16, 16), 10)
    assert json.loads(meta["mean"]) is None  # no normalization given
    assert "policy_hash" not in meta
    assert all(m.training for m in model.modules())


def test_export_leaves_only_the_model_file(tmp_path):
    harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_needs_an_input_shape(tmp_path):
    with pytest.raises(harden.ExportError, match="input_shape"):
        harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, tracing freezes one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.sum()) > 0.0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        raise NotImplementedError("this model cannot be traced")


def test_export_falls_back_with_a_warning(tmp_path):
    path = tmp_path / "branch.onnx"
    with pytest.warns(RuntimeWarning, match="falling back to the TorchScript exporter"):
        result = harden.export_onnx(DataDependentBranch(), path, input_shape=(1, 2, 2))
    assert result.exporter == "torchscript"
    assert result.parity_argmax_agreement == 1.0
    assert path.is_file()


def test_unexportable_model_raises_export_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with (
        pytest.warns(RuntimeWarning, match="dynamo ONNX export failed"),
        pytest.raises(harden.ExportError, match="export to ONNX"),
    ):
        harden.export_onnx(Unexportable(), path, input_shape=(1, 2, 2))
    assert not path.exists()
    assert not list(tmp_path.glob("*.onnx"))


# --------------------------------------------------------------------------- adversarial examples kept for parity


def test_verify_keeps_no_adversarial_examples_by_default(fitted):
    policy, result = fitted
    report = harden.verify(result.model, policy, synthetic_tensors(30, seed=5), progress=False)
    assert report.adversarial is None
    assert "adversarial" not in report.to_dict()


def test_verify_keeps_worst_case_adversarial_examples(fitted):
    policy, result = fitted
    x, y = synthetic_tensors(60, seed=5)
    plain = harden.verify(result.model, policy, (x, y), progress=False)
    report = harden.verify(result.model, policy, (x, y), progress=False, keep_adversarial=10)
    assert report_key(report) == report_key(plain)  # keeping them changes no figure
    assert "adversarial" not in json.loads(json.dumps(report.to_dict()))
    adv = report.adversarial
    assert adv is not None and adv.shape == (10, 1, 8, 8)
    assert adv.dtype == torch.float32 and adv.device.type == "cpu"
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # each is inside the eps ball of some clean input, and not a clean input itself
    dist = (adv.flatten(1)[:, None, :] - x.flatten(1)[None, :, :]).abs().amax(dim=2).min(dim=1).values
    assert bool((dist <= 0.1 + 1e-6).all()) and bool((dist > 0).all())
    # the examples an attack fooled come first
    fooled = report.n - round(report.n * report.robust_accuracy) - report.broken_by["clean"]
    with torch.no_grad():
        pred = copy.deepcopy(result.model).eval()(adv).argmax(1)
    first = min(fooled, 10)
    owners = (adv.flatten(1)[:, None, :] - x.flatten(1)[None, :, :]).abs().amax(dim=2).argmin(dim=1)
    assert bool((pred[:first] != y[owners[:first]]).all())


def test_verify_keeps_at_most_the_attacked_examples(fitted):
    policy, result = fitted
    report = harden.verify(result.model, policy, synthetic_tensors(30, seed=5), progress=False, keep_adversarial=1000)
    attacked = report.n - report.broken_by["clean"]
    assert report.adversarial is not None and report.adversarial.shape[0] == attacked


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_verify_refuses_a_bad_keep_adversarial(bad):
    with pytest.raises(harden.DataError, match="keep_adversarial"):
        harden.verify(TinyCNN(num_classes=3), fast_policy(), synthetic_tensors(8), progress=False, keep_adversarial=bad)


def test_run_suite_keeps_the_worst_case_input_per_example():
    from harden.attacks import build_attack, run_suite
    from harden.policy import AttackSpec

    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).eval()
    x, y = synthetic_tensors(20, seed=4)
    attacks = [build_attack(AttackSpec(name="pgd", params={"steps": 5}), harden.ThreatModel(eps=0.1))]
    assert run_suite(model, x, y, attacks).x_adv is None
    r = run_suite(model, x, y, attacks, keep_adversarial=True)
    assert r.x_adv is not None and r.x_adv.shape == x.shape
    assert torch.equal(r.x_adv[~r.clean_correct], x[~r.clean_correct])  # not attacked: the clean input
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    hit = torch.tensor([b == "pgd" for b in r.broken_by])
    assert bool((pred[hit] != y[hit]).all())
    both = run_suite(model, x[:8], y[:8], attacks, keep_adversarial=True)
    both.extend(run_suite(model, x[8:], y[8:], attacks, keep_adversarial=True))
    assert both.x_adv is not None and both.x_adv.shape == x.shape


@contextlib.contextmanager
def _float32_convolutions():
    """cuDNN convolutions in IEEE float32 (no TF32) for a comparison with the CPU, restored after."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = saved
        return
    saved_flag = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved_flag


@pytest.mark.gpu
def test_verify_on_cuda_runs_the_suite_and_the_checks_there(fitted):
    fit_policy, result = fitted
    raw = fit_policy.model_dump(mode="json")
    raw["verify"] = {**raw["verify"], "checks": True, "check_examples": 32, "check_steps": 5}
    policy = harden.validate_policy(raw)
    model = copy.deepcopy(result.model).cuda().eval()
    x, y = synthetic_tensors(90, seed=5)
    cpu = harden.verify(result.model, policy, (x, y), progress=False)
    gpu = harden.verify(model, policy, (x.cuda(), y.cuda()), progress=False, keep_adversarial=8)
    assert gpu.n == 90 and gpu.robust_accuracy <= gpu.clean_accuracy
    assert gpu.adversarial is not None and len(gpu.adversarial) == 8  # returned on the CPU, as documented
    assert all(p.device.type == "cuda" for p in model.parameters()) and not model.training
    assert cpu.checks and set(gpu.checks) == set(cpu.checks)
    assert {c["status"] for c in gpu.checks.values()} == {c["status"] for c in cpu.checks.values()}, gpu.checks
    with _float32_convolutions(), torch.no_grad():
        ref, got = result.model(x), model(x.cuda()).cpu()
    # TinyCNN's logits are O(1) sums of at most 8*8*16 float32 products: reordering moves them < 1e-4
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
