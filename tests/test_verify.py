"""harden.verify: the robustness report (worst case over the suite, seeded, modes kept, adversarial examples kept)."""

import contextlib
import copy
import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.attacks.base import save_modes
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy
from harden.verify import verify


def fast_policy(**updates):
    """tiny_policy with the attack suite only: no sanity checks, no eps sweep (tested elsewhere)."""
    verify = {"checks": False, "eps_sweep": [], **updates.pop("verify", {})}
    return tiny_policy(verify=verify, **updates)


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


def test_verify_reports_invariance_examples_apart(trained):
    policy = tiny_policy(
        verify={
            "attacks": [{"name": "fgsm"}, {"name": "invariance_examples", "params": {"angles": 3, "shifts": 3}}],
            "checks": False,
            "eps_sweep": [],
        }
    )
    report = verify(trained, policy, synthetic_tensors(48, seed=5), progress=False)
    assert list(report.per_attack) == ["fgsm"]
    assert 0.0 <= report.other_threats["invariance_examples"] <= 1.0
    assert report.other_counts["invariance_examples"] == 48
    assert "agreement with the new label" in report.summary()
