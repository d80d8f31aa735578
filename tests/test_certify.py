"""harden.certify: the certificate's verdict (empirical, certified by smoothing, unreliable), contents and schema."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

import harden
from harden.certify import Certificate
from harden.cli import main
from harden.docs import CERTIFICATE_SCHEMA_PATH, certificate_schema
from harden.testing import ConstantClassifier, TinyCNN, synthetic_tensors, tiny_policy

ROOT = Path(__file__).resolve().parents[1]


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
    assert Certificate.load(path).model_copy(update={"rendered": {}}) == cert
    for name in ("certificate.json", "certificate.md", "certificate.html"):
        assert (tmp_path / name).is_file(), name


def test_published_certificate_schema_is_current():
    published = (ROOT / CERTIFICATE_SCHEMA_PATH).read_text()
    assert published == certificate_schema(), "run `python -m harden.docs` to regenerate it"
    assert json.loads(published)["properties"]["verdict"]["enum"] == ["EMPIRICAL", "CERTIFIED", "UNRELIABLE"]


def test_schema_cli_prints_the_certificate_schema(capsys):
    assert main(["schema", "--certificate"]) == 0
    assert json.loads(capsys.readouterr().out) == Certificate.json_schema()


def fast_policy(**updates):
    """tiny_policy with the attack suite only: no sanity checks, no eps sweep (tested elsewhere)."""
    verify = {"checks": False, "eps_sweep": [], **updates.pop("verify", {})}
    return tiny_policy(verify=verify, **updates)


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
    assert Certificate.load(path).model_copy(update={"rendered": {}}) == cert
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


def test_an_eps_below_half_a_pixel_level_is_marked_in_the_certificate():
    with pytest.warns(UserWarning, match="below half a pixel level"):  # at validation, as in harden check
        tiny = tiny_policy(threat={"norm": "linf", "eps": 1e-300}, verify={"checks": False})
    cert = harden.certify(TinyCNN(num_classes=3), tiny, synthetic_tensors(8), progress=False)
    assert len(cert.warnings) == 1 and "below half a pixel level" in cert.warnings[0]
    normal = harden.certify(
        TinyCNN(num_classes=3), tiny_policy(verify={"checks": False}), synthetic_tensors(8), progress=False
    )
    assert normal.warnings == []
    assert Certificate.model_validate(cert.model_dump()).warnings == cert.warnings


def test_a_baseline_runs_the_same_suite_on_the_same_examples():
    from harden.consistency import consistency_problems
    from harden.smoothing import wilson_interval

    torch.manual_seed(0)
    model, baseline = TinyCNN(num_classes=3), TinyCNN(num_classes=3)
    policy = tiny_policy(verify={"eps_sweep": [0.05, 0.1]})
    data = synthetic_tensors(24)
    cert = harden.certify(model, policy, data, baseline=baseline, progress=False)
    b = cert.baseline
    assert b is not None and b.n == cert.n == 24
    quick = policy.model_copy(update={"verify": policy.verify.model_copy(update={"checks": False})})
    alone = harden.verify(baseline, quick, data, progress=False)  # the same suite, sample and seed
    assert (b.clean_accuracy, b.robust_accuracy, b.per_attack) == (
        alone.clean_accuracy, alone.robust_accuracy, alone.per_attack
    )  # fmt: skip
    assert b.eps_curve == alone.eps_curve and [e for e, _ in b.eps_curve] == [e for e, _ in cert.eps_curve]
    assert list(b.per_attack) == list(cert.per_attack)
    assert b.intervals["robust"] == wilson_interval(round(b.robust_accuracy * b.n), b.n)
    assert b.weights_sha256 is not None and b.weights_sha256 != cert.weights_sha256
    assert cert.checks and set(cert.checks) == set(harden.verify(model, policy, data, progress=False).checks)
    assert [item for item, problems in consistency_problems(cert) if problems] == []
    assert set(cert.saliency[0].maps) == {"hardened", "baseline"}


def test_assemble_takes_the_baseline_report_and_the_policy_targets():
    from harden.certify import assemble
    from harden.measure import Measurements

    torch.manual_seed(0)
    model = TinyCNN(num_classes=3)
    targets = ["robust_accuracy >= 0", "clean_accuracy > 100%", "certified_accuracy >= 0"]
    policy = tiny_policy(verify={"checks": False, "eps_sweep": []}, certify={"require": targets})
    report = harden.verify(model, policy, synthetic_tensors(12), progress=False)
    cert = assemble(model, policy, report, Measurements(), baseline_report=report)
    assert cert.baseline is not None and cert.baseline.robust_accuracy == cert.robust_accuracy
    assert cert.baseline.weights_sha256 is None  # no model handed over: nothing to hash
    got = [(r.text, r.actual, r.passed) for r in cert.requirements]
    assert got == [
        ("robust_accuracy >= 0%", cert.robust_accuracy, True),
        ("clean_accuracy > 100%", cert.clean_accuracy, False),
        ("certified_accuracy >= 0%", None, False),  # smoothing off: not measured, so it fails
    ]
    assert cert.verdict == "EMPIRICAL"  # targets do not change the verdict
    assert assemble(model, policy, report, Measurements()).baseline is None


def test_the_check_subset_and_the_eps_curve_bands_are_recorded():
    from harden.smoothing import wilson_interval

    torch.manual_seed(0)
    policy = tiny_policy(verify={"checks": False, "eps_sweep": [0.05, 0.1], "check_examples": 10})
    cert = harden.certify(TinyCNN(num_classes=3), policy, synthetic_tensors(16), progress=False)
    assert cert.check_n == 10
    assert cert.check_clean_accuracy == cert.eps_curve[0][1]  # eps 0 is the check subset, unattacked
    assert cert.eps_intervals == [wilson_interval(round(a * 10), 10) for _, a in cert.eps_curve]
    assert len(cert.eps_intervals) == 3


def test_per_class_counts_come_from_the_report_and_may_be_absent():
    from harden.certify import assemble
    from harden.measure import Measurements

    torch.manual_seed(0)
    model = TinyCNN(num_classes=3)
    policy = fast_policy()
    report = harden.verify(model, policy, synthetic_tensors(9), progress=False)
    clean, robust = round(report.clean_accuracy * 9), round(report.robust_accuracy * 9)
    report.per_class = [
        {"label": 0, "name": "zero", "n": 9, "clean": clean, "robust": robust},
        {"label": 1, "name": None, "n": 0, "clean": 0, "robust": 0},
    ]
    cert = assemble(model, policy, report, Measurements())
    assert [(c.label, c.name, c.n, c.clean, c.robust) for c in cert.per_class] == [
        (0, "zero", 9, clean, robust), (1, None, 0, 0, 0)
    ]  # fmt: skip
    report.per_class = []  # an older report had none
    assert assemble(model, policy, report, Measurements()).per_class == []


def test_a_suite_without_a_gradient_attack_and_a_probe_chosen_epoch_are_warned_about():
    from harden.certify import _warnings

    weak = tiny_policy(verify={"attacks": [{"name": "noise"}]}, train={"select": "best"})
    found = _warnings(weak)
    assert any("no gradient-based attack" in w for w in found)
    assert any("chosen on the per-epoch probe" in w for w in found)
    assert _warnings(tiny_policy()) == []  # fgsm + pgd, the last epoch: nothing to warn about
