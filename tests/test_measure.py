"""harden.measure: smoothing and saliency beyond the attack suite, and the undefended baseline's verification."""

import importlib

import torch

import harden
from harden.measure import Measurements, measure, saliency_map, verify_baseline
from harden.testing import ConstantClassifier, TinyCNN, synthetic_tensors, tiny_policy


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


def test_measure_is_seeded_and_leaves_the_rng_and_the_modes_alone():
    torch.manual_seed(1)
    model, baseline = TinyCNN(num_classes=3), TinyCNN(num_classes=3)  # both in train mode
    policy = tiny_policy(certify={"smoothing": True, "n_examples": 4, "n0": 8, "n": 32, "saliency_examples": 2})
    data = synthetic_tensors(8)
    state = torch.get_rng_state()
    m = measure(model, policy, data, baseline=baseline, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # forked: the caller's RNG did not move
    assert model.training and baseline.training  # evaluated in eval mode, then restored
    s = m.smoothing
    assert s is not None and s.examples == 4 and s.n0 == 8 and s.n == 32
    assert len(s.labels) == len(s.predictions) == len(s.radii) == 4
    assert m.timings == {"smoothing": s.seconds}
    assert [set(ex.maps) for ex in m.saliency] == [{"hardened", "baseline"}] * 2
    _, y = data
    assert [ex.label for ex in m.saliency] == y[:2].tolist()  # the first examples, in order
    again = measure(model, policy, data, baseline=baseline, progress=False)
    assert (again.smoothing.predictions, again.smoothing.radii) == (s.predictions, s.radii)  # seeded
    assert again.saliency == m.saliency


def test_measure_with_nothing_asked_measures_nothing():
    policy = tiny_policy(certify={"smoothing": False, "saliency_examples": 0})
    assert measure(TinyCNN(num_classes=3), policy, synthetic_tensors(4), progress=False) == Measurements()


def test_a_saliency_example_records_the_prediction_rounded_image_and_map():
    x, y = synthetic_tensors(3, num_classes=3)
    m = measure(ConstantClassifier(3, 2), tiny_policy(certify={"saliency_examples": 3}), (x, y), progress=False)
    assert [ex.prediction for ex in m.saliency] == [2, 2, 2]  # the constant model's class
    ex = m.saliency[0]
    assert set(ex.maps) == {"hardened"}  # no baseline handed over
    image = torch.tensor(ex.image)
    assert torch.equal(image, torch.round(x[0] * 1000) / 1000)  # stored to 3 decimals
    assert ex.maps["hardened"] == [[0.0] * 8] * 8  # a constant model has no input gradient


def test_verify_baseline_is_verify_with_the_checks_off():
    torch.manual_seed(0)
    baseline = TinyCNN(num_classes=3)
    policy = tiny_policy(verify={"eps_sweep": [0.1]})
    data = synthetic_tensors(8)
    report = verify_baseline(baseline, policy, data, progress=False)
    assert report.checks == {} and policy.verify.checks  # the caller's policy is not edited
    quick = policy.model_copy(update={"verify": policy.verify.model_copy(update={"checks": False})})
    alone = harden.verify(baseline, quick, data, progress=False)
    assert (report.n, report.clean_accuracy, report.robust_accuracy, report.per_attack) == (
        alone.n, alone.clean_accuracy, alone.robust_accuracy, alone.per_attack
    )  # fmt: skip
    assert report.eps_curve == alone.eps_curve


def test_certify_re_exports_the_moved_names():
    certify_module = importlib.import_module("harden.certify")  # harden.certify is the function
    for name in ("Measurements", "measure", "saliency_map", "verify_baseline"):
        assert getattr(certify_module, name) is getattr(importlib.import_module("harden.measure"), name)
        assert name in certify_module.__all__
