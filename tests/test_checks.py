import pytest
import torch

import harden
from harden.checks import CHECKS, CheckContext, run_checks
from harden.policy import ThreatModel
from harden.testing import QuantizedInput, SoftmaxHead, TinyCNN, TinyMLP, synthetic_tensors, tiny_policy


def _ctx(model, **kw):
    x, y = synthetic_tensors(96, seed=2)
    return CheckContext(model, x, y, ThreatModel(eps=0.1), num_classes=3, steps=10, **kw)


def test_every_check_has_id_condition_and_remedy():
    assert len(CHECKS) >= 7
    for cid, spec in CHECKS.items():
        assert spec.id == cid
        assert len(spec.raised_if) > 20 and len(spec.remedy) > 20


def test_plainly_trained_model_passes_every_check(trained):
    torch.manual_seed(0)
    results = run_checks(_ctx(trained))
    assert set(results) == set(CHECKS)
    failed = {k: v.detail for k, v in results.items() if v.status != "PASS"}
    assert failed == {}


@pytest.mark.parametrize("wrap", [QuantizedInput, SoftmaxHead], ids=["quantized-input", "softmax-head"])
def test_gradient_masking_models_fail(trained, wrap):
    torch.manual_seed(0)
    results = run_checks(_ctx(wrap(trained)))
    assert results["input_gradients"].status == "FAIL"
    assert results["unbounded_attack_succeeds"].status == "FAIL"
    assert results["large_eps_to_chance"].status == "FAIL"


def test_softmax_head_is_flagged_as_probabilities(trained):
    results = run_checks(_ctx(SoftmaxHead(trained)), ["logits_not_probabilities"])
    assert results["logits_not_probabilities"].status == "FAIL"


class _Noisy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + torch.randn(x.shape[0], 3) * 0.5


def test_random_forward_is_detected_with_eot_advice(trained):
    result = run_checks(_ctx(_Noisy(trained)), ["deterministic_eval"])["deterministic_eval"]
    assert result.status == "FAIL"
    assert "EOT" in result.detail or "EOT" in result.remedy


def test_black_box_only_breaks_are_listed():
    ctx = _ctx(TinyCNN(num_classes=3), broken_by=["", "pgd", "square", "clean", "square"] * 4, white_box=["pgd"])
    result = run_checks(ctx, ["white_box_beats_black_box"])["white_box_beats_black_box"]
    assert result.status == "FAIL"
    assert "8 of 20" in result.detail and "indices 2, 4, 7" in result.detail


def test_catastrophic_overfitting_probe():
    ok = _ctx(
        TinyCNN(num_classes=3),
        history=[{"val_pgd_acc": 0.4, "val_clean_acc": 0.9}, {"val_pgd_acc": 0.45, "val_clean_acc": 0.9}],
    )
    bad = _ctx(
        TinyCNN(num_classes=3),
        history=[{"val_pgd_acc": 0.4, "val_clean_acc": 0.9}, {"val_pgd_acc": 0.02, "val_clean_acc": 0.95}],
    )
    assert run_checks(ok, ["no_catastrophic_overfitting"])["no_catastrophic_overfitting"].status == "PASS"
    assert run_checks(bad, ["no_catastrophic_overfitting"])["no_catastrophic_overfitting"].status == "FAIL"


def test_checks_restore_model_modes(trained):
    model = TinyCNN(num_classes=3)
    model.train()
    model.features[1].eval()
    run_checks(_ctx(model), ["deterministic_eval", "input_gradients"])
    assert model.training and not model.features[1].training


@pytest.mark.slow
def test_verify_flags_masked_model_unreliable_and_plain_reliable(trained):
    policy = tiny_policy(
        verify={"attacks": [{"name": "pgd", "params": {"steps": 10}}, {"name": "noise"}], "check_steps": 10}
    )
    data = synthetic_tensors(96, seed=2)
    plain = harden.verify(trained, policy, data, progress=False)
    masked = harden.verify(QuantizedInput(trained), policy, data, progress=False)
    assert plain.reliable, plain.checks
    assert not masked.reliable
    cert = harden.certify(QuantizedInput(trained), policy, report=masked)
    assert cert.verdict == "UNRELIABLE"
    assert harden.certify(trained, policy, report=plain).verdict == "EMPIRICAL"
    # the eps curve starts at clean accuracy and falls
    accs = [a for _, a in plain.eps_curve]
    assert plain.eps_curve[0][0] == 0.0
    assert accs[-1] < accs[0]


def test_softmax_head_at_temperature_one_fails_the_logits_check():
    net = SoftmaxHead(TinyMLP(num_classes=3), temperature=1.0)
    x, y = synthetic_tensors(16)
    ctx = CheckContext(net, x, y, ThreatModel(eps=0.1), num_classes=3, steps=2)
    assert run_checks(ctx, ["logits_not_probabilities"])["logits_not_probabilities"].status == "FAIL"
