"""Randomized smoothing, the certificate's verdict and contents, and `harden inspect`."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from scipy.stats import binom, norm

import harden
from harden.certify import Certificate, saliency_map
from harden.cli import main
from harden.docs import CERTIFICATE_SCHEMA_PATH, certificate_schema
from harden.integrity import inspect_certificate
from harden.smoothing import (
    ABSTAIN,
    certified_accuracy,
    clopper_pearson_lower,
    sample_counts,
    smooth_certify,
    wilson_interval,
)
from harden.testing import ConstantClassifier, TinyCNN, synthetic_tensors, tiny_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("k", "n"), [(1, 10), (37, 50), (990, 1000), (500, 1000)])
def test_clopper_pearson_lower_solves_its_defining_equation(k, n):
    alpha = 0.001
    p = clopper_pearson_lower(k, n, alpha)
    # the lower bound is the p at which seeing >= k successes has probability exactly alpha
    assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    assert 0 < p < k / n


def test_clopper_pearson_all_successes_and_none():
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    with pytest.raises(ValueError, match="successes <= trials"):
        clopper_pearson_lower(5, 4, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(1, 4, 1.5)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)


def test_constant_classifier_certifies_the_closed_form_radius():
    sigma, n, alpha = 0.5, 200, 0.001
    x, _ = synthetic_tensors(6, num_classes=3)
    y = torch.tensor([2, 2, 2, 0, 1, 2])
    torch.manual_seed(0)
    res = smooth_certify(ConstantClassifier(3, label=2), x, y, sigma=sigma, n0=20, n=n, alpha=alpha, progress=False)
    expected = sigma * norm.ppf(alpha ** (1 / n))
    assert res.predictions == [2] * 6
    assert res.radii == pytest.approx([expected] * 6, rel=1e-9)
    assert res.abstentions == 0
    assert res.accuracy_at(0.0) == pytest.approx(4 / 6)
    assert res.accuracy_at(expected) == pytest.approx(4 / 6)
    assert res.accuracy_at(expected + 1e-6) == 0.0
    assert res.samples == 6 * (20 + n)


def test_too_few_samples_abstain():
    # alpha ** (1 / n) < 1/2 for n = 5: even unanimous votes cannot certify anything
    x, y = synthetic_tensors(4, num_classes=3)
    res = smooth_certify(ConstantClassifier(3, 0), x, y, sigma=0.25, n0=5, n=5, alpha=0.001, progress=False)
    assert res.predictions == [ABSTAIN] * 4
    assert res.radii == [0.0] * 4
    assert res.abstentions == 4
    assert res.accuracy_at(0.0) == 0.0


def test_sample_counts_sum_to_n_whatever_the_batching():
    model = TinyCNN(num_classes=3).eval()
    x, _ = synthetic_tensors(5, num_classes=3)
    for batch_size in (1, 7, 64, 1000):
        counts = sample_counts(model, x, 33, 0.2, batch_size, 3)
        assert counts.shape == (5, 3)
        assert counts.sum(1).tolist() == [33] * 5


def test_noise_changes_votes_of_a_real_model():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).eval()
    x, _ = synthetic_tensors(8, num_classes=3)
    counts = sample_counts(model, x, 200, 1.0, 256, 3)
    assert (counts.max(1).values < 200).any()  # large noise flips some votes


def test_certified_accuracy_counts_abstentions_as_wrong():
    assert certified_accuracy([0, 1, 2], [0, 1, ABSTAIN], [0.5, 0.1, 0.0], 0.0) == pytest.approx(2 / 3)
    assert certified_accuracy([0, 1, 2], [0, 2, 2], [0.5, 0.9, 0.9], 0.2) == pytest.approx(2 / 3)


def _policy(**certify):
    return tiny_policy(certify={"smoothing": True, "n0": 10, "n": 100, "n_examples": 8, **certify})


def test_certified_verdict_when_smoothing_certifies_the_radius():
    policy = _policy(radius=0.1, sigma=0.25, min_certified_accuracy=0.5)
    policy = policy.model_copy(update={"verify": policy.verify.model_copy(update={"checks": False})})
    x, _ = synthetic_tensors(16, num_classes=3)
    y = torch.zeros(16, dtype=torch.long)
    cert = harden.certify(ConstantClassifier(3, 0), policy, (x, y), progress=False)
    assert cert.verdict == "CERTIFIED", cert.verdict_reason
    s = cert.smoothing
    assert s is not None and s.examples == 8 and s.abstentions == 0
    assert s.certified_accuracy == 1.0
    assert s.radius == 0.1
    assert "0.1" in cert.verdict_reason
    # the curve falls to zero beyond the closed-form radius
    limit = 0.25 * norm.ppf(0.001 ** (1 / 100))
    assert all(acc == (1.0 if r <= limit else 0.0) for r, acc in s.curve)


def test_failed_check_beats_smoothing():
    # a constant model has zero input gradients: the checks FAIL, whatever smoothing says
    x, _ = synthetic_tensors(16, num_classes=3)
    cert = harden.certify(
        ConstantClassifier(3, 0), _policy(radius=0.1), (x, torch.zeros(16, dtype=torch.long)), progress=False
    )
    assert cert.verdict == "UNRELIABLE"
    assert "sanity check" in cert.verdict_reason


def test_linf_threat_without_radius_stays_empirical():
    policy = _policy()
    policy = policy.model_copy(update={"verify": policy.verify.model_copy(update={"checks": False})})
    x, _ = synthetic_tensors(16, num_classes=3)
    cert = harden.certify(ConstantClassifier(3, 0), policy, (x, torch.zeros(16, dtype=torch.long)), progress=False)
    assert cert.verdict == "EMPIRICAL"
    assert "linf" in cert.verdict_reason
    assert cert.smoothing is not None and cert.smoothing.certified_accuracy is None


def test_low_certified_accuracy_is_empirical():
    policy = _policy(radius=0.1, min_certified_accuracy=0.9)
    policy = policy.model_copy(update={"verify": policy.verify.model_copy(update={"checks": False})})
    x, _ = synthetic_tensors(16, num_classes=3)
    y = torch.tensor([0, 1] * 8)  # the constant model is right on half
    cert = harden.certify(ConstantClassifier(3, 0), policy, (x, y), progress=False)
    assert cert.verdict == "EMPIRICAL"
    assert cert.smoothing.certified_accuracy == pytest.approx(0.5)
    assert "below the required 90%" in cert.verdict_reason


def test_certificate_contents_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model, baseline = TinyCNN(num_classes=3), TinyCNN(num_classes=3)
    policy = tiny_policy(certify={"saliency_examples": 3})
    history = [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]
    data = synthetic_tensors(32)
    was_training = model.training
    cert = harden.certify(model, policy, data, history=history, baseline=baseline, progress=False)
    assert model.training == was_training and baseline.training
    assert cert.objectives == [o.model_dump(mode="json") for o in policy.objectives]
    assert cert.epochs == policy.train.epochs
    assert cert.training == history
    assert len(cert.saliency) == 3
    ex = cert.saliency[0]
    assert set(ex.maps) == {"hardened", "baseline"}
    assert len(ex.image) == 1 and len(ex.image[0]) == 8 and len(ex.maps["hardened"]) == 8
    assert max(max(row) for row in ex.maps["hardened"]) == pytest.approx(1.0)
    lo, hi = cert.intervals["robust"]
    assert lo <= cert.robust_accuracy <= hi
    assert set(cert.intervals) >= {"clean", "robust", *cert.per_attack}
    path = cert.save(tmp_path)
    assert Certificate.load(path) == cert
    for name in ("certificate.json", "certificate.md", "certificate.html"):
        assert (tmp_path / name).is_file(), name


def test_saliency_map_is_the_scaled_input_gradient():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).eval()
    x, y = synthetic_tensors(2, num_classes=3)
    sal = saliency_map(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    xg = x[:1].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(xg), y[:1]).backward()
    g = xg.grad.abs().amax(1)[0]
    assert torch.allclose(sal[0], g / g.max(), atol=1e-6)


def test_published_certificate_schema_is_current():
    published = (ROOT / CERTIFICATE_SCHEMA_PATH).read_text()
    assert published == certificate_schema(), "run `python -m harden.docs` to regenerate it"
    assert json.loads(published)["properties"]["verdict"]["enum"] == ["EMPIRICAL", "CERTIFIED", "UNRELIABLE"]


def test_schema_cli_prints_the_certificate_schema(capsys):
    assert main(["schema", "--certificate"]) == 0
    assert json.loads(capsys.readouterr().out) == Certificate.json_schema()


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


@pytest.mark.gpu
def test_smoothing_on_cuda_certifies_the_closed_form_radius():
    sigma, n, alpha = 0.5, 200, 0.001
    x, _ = synthetic_tensors(6, num_classes=3)
    y = torch.tensor([2, 2, 2, 0, 1, 2])
    model = ConstantClassifier(3, label=2).cuda()
    res = smooth_certify(model, x.cuda(), y.cuda(), sigma=sigma, n0=20, n=n, alpha=alpha, progress=False)
    assert res.predictions == [2] * 6
    assert res.radii == pytest.approx([sigma * norm.ppf(alpha ** (1 / n))] * 6, rel=1e-9)
    counts = sample_counts(TinyCNN(num_classes=3).cuda().eval(), x.cuda(), 33, 0.2, 7, 3)
    assert counts.sum(1).tolist() == [33] * 6
