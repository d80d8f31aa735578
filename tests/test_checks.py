import typing

import pytest
import torch

import harden
import harden.checks
from harden.checks import CHECKS, CheckContext, Status, onnx_black_box_check, run_checks
from harden.policy import ThreatModel
from harden.testing import QuantizedInput, RowCounter, SoftmaxHead, TinyCNN, TinyMLP, synthetic_tensors, tiny_policy


def _ctx(model, **kw):
    x, y = synthetic_tensors(96, seed=2)
    return CheckContext(model, x, y, ThreatModel(eps=0.1), num_classes=3, steps=10, **kw)


def test_every_check_has_id_condition_and_remedy():
    assert len(CHECKS) >= 7
    for cid, spec in CHECKS.items():
        assert spec.id == cid
        assert len(spec.raised_if) > 20 and len(spec.remedy) > 20


HISTORY = [{"val_pgd_acc": 0.4, "val_clean_acc": 0.9}, {"val_pgd_acc": 0.45, "val_clean_acc": 0.9}]


def test_plainly_trained_model_passes_every_check(trained):
    torch.manual_seed(0)
    suite = {"broken_by": ["", "pgd", "clean"] * 20, "white_box": ["pgd"], "black_box": ["square"]}
    results = run_checks(_ctx(trained, history=HISTORY, **suite))
    assert set(results) == set(CHECKS)
    failed = {k: v.detail for k, v in results.items() if v.status != "PASS"}
    assert failed == {}


def test_skip_is_a_status_and_never_a_pass():
    assert typing.get_args(Status) == ("PASS", "WARN", "FAIL", "SKIP")


@pytest.mark.parametrize(
    ("suite", "why"),
    [
        ({"white_box": ["pgd"]}, "no black-box attack in the suite"),
        ({"black_box": ["square"], "broken_by": ["", "square"]}, "no white-box attack in the suite"),
        ({"white_box": ["pgd"], "black_box": ["square"]}, "no outcomes of the suite"),
        (  # every example fell to the white-box attack or was wrong: the black-box one attacked none
            {"white_box": ["pgd"], "black_box": ["square"], "broken_by": ["pgd", "clean", "pgd"]},
            "no example survived the white-box attacks",
        ),
    ],
    ids=["no-black-box", "no-white-box", "no-outcomes", "none-reached-black-box"],
)
def test_white_box_beats_black_box_skips_when_nothing_was_compared(suite, why):
    result = run_checks(_ctx(TinyCNN(num_classes=3), **suite), ["white_box_beats_black_box"])
    assert result["white_box_beats_black_box"].status == "SKIP"
    assert why in result["white_box_beats_black_box"].detail


@pytest.mark.parametrize(
    ("history", "why"),
    [([], "no training history"), (HISTORY[:1], "1 epoch(s) with a PGD probe"), ([{"loss": 1.0}] * 3, "0 epoch")],
)
def test_catastrophic_overfitting_skips_without_two_probed_epochs(history, why):
    result = run_checks(_ctx(TinyCNN(num_classes=3), history=history), ["no_catastrophic_overfitting"])
    assert result["no_catastrophic_overfitting"].status == "SKIP"
    assert why in result["no_catastrophic_overfitting"].detail


class _Constant(torch.nn.Module):
    """Always the same logits (class 0 wins), with a non-zero input gradient."""

    def forward(self, x):
        return torch.tensor([[2.0, 0.0, -1.0]]) + 0.01 * x.flatten(1).sum(1, keepdim=True)


def test_attack_checks_skip_when_the_model_gets_nothing_right_to_attack():
    x, y = synthetic_tensors(96, seed=2)
    wrong = CheckContext(_Constant(), x[y != 0], y[y != 0], ThreatModel(eps=0.1), num_classes=3, steps=2)
    results = run_checks(wrong, ["large_eps_to_chance", "unbounded_attack_succeeds", "more_iterations_never_help"])
    assert {k: r.status for k, r in results.items()} == dict.fromkeys(results, "SKIP")
    assert "clean accuracy 0.0%" in results["unbounded_attack_succeeds"].detail
    # on balanced labels the constant model is right on a third: chance (1/3), nothing for PGD to lower
    at_chance = CheckContext(_Constant(), x, y, ThreatModel(eps=0.1), num_classes=3, steps=2)
    result = run_checks(at_chance, ["large_eps_to_chance"])["large_eps_to_chance"]
    assert (
        result.status == "SKIP" and "clean accuracy 33.3% is already within 5 points of chance (33.3%)" in result.detail
    )


def test_onnx_check_with_nothing_to_compare_skips():
    assert onnx_black_box_check([], []).status == "SKIP"


def test_run_checks_shows_one_bar_step_per_check(monkeypatch, trained):
    bars = []

    class Bar:
        def __init__(self, total, desc, disable, **_):
            self.total, self.desc, self.disable, self.n = total, desc, disable, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_postfix_str(self, *_, **__):
            pass

        def update(self, k):
            self.n += k

    monkeypatch.setattr(harden.checks, "tqdm", Bar)
    ids = ["deterministic_eval", "logits_not_probabilities", "input_gradients"]
    run_checks(_ctx(trained), ids, progress=True)
    run_checks(_ctx(trained), ids)
    assert [(b.desc, b.total, b.n, b.disable) for b in bars] == [("checks", 3, 3, False), ("checks", 3, 3, True)]


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
    ctx = _ctx(
        TinyCNN(num_classes=3),
        broken_by=["", "pgd", "square", "clean", "square"] * 4,
        white_box=["pgd"],
        black_box=["square"],
    )
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


def test_listed_examples_are_named_by_their_index_in_the_data():
    broken = ["", "pgd", "square", "clean", "square"] * 4
    indices = [100 + 3 * i for i in range(20)]
    ctx = _ctx(TinyCNN(num_classes=3), broken_by=broken, white_box=["pgd"], black_box=["square"], indices=indices)
    detail = run_checks(ctx, ["white_box_beats_black_box"])["white_box_beats_black_box"].detail
    assert "(indices 106, 112, 121," in detail  # positions 2, 4, 7 of the verified examples
    onnx = onnx_black_box_check(["", "", ""], ["", "square", ""], indices=[7, 40, 90])
    assert onnx.status == "FAIL" and onnx.detail.endswith("(indices 40)")


def test_more_iterations_continues_the_sweeps_run_on_the_examples_it_left_right(trained):
    net = RowCounter(trained)
    ctx = _ctx(net)
    base = ctx.attack(0.1)  # the eps sweep's run at the threat's eps
    left, n = int(base.right.sum()), len(ctx.y)
    net.rows = 0
    result = run_checks(ctx, ["more_iterations_never_help"])["more_iterations_never_help"]
    assert result.detail.startswith(f"PGD-10 {base.accuracy:.1%}, +10 steps ")  # from a random start: no note
    # 10 more steps on the `left` examples, then one run of 10 from a random start on at most them; a fresh
    # forward pass on the n points scores each run. Two independent runs on every example would pass 22 n.
    assert 0 < net.rows <= 2 * 10 * left + 2 * n
    assert left < n  # so the bound is below what the runs on every example would cost


def test_more_iterations_names_the_sweeps_steps_when_its_base_run_is_the_sweeps(trained):
    x, y = synthetic_tensors(96, seed=2)
    ctx = CheckContext(trained, x, y, ThreatModel(eps=0.1), num_classes=3, steps=10, sweep_steps=4, seed=1)
    result = run_checks(ctx, ["more_iterations_never_help"])["more_iterations_never_help"]
    assert result.detail.startswith(f"PGD-4 {ctx.attack(0.1).accuracy:.1%}, +10 steps ")


class _Coin(torch.nn.Module):
    """Random answers on every call (the forward pass is pure noise)."""

    def forward(self, x):
        return torch.randn(x.shape[0], 3) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_more_iterations_can_fail_on_a_model_whose_answers_are_random():
    statuses = []
    for seed in range(5):
        torch.manual_seed(seed)
        ctx = _ctx(_Coin())
        statuses.append(run_checks(ctx, ["more_iterations_never_help"])["more_iterations_never_help"].status)
    # each figure is a fresh forward pass: random answers make a longer run look better than the base
    assert "FAIL" in statuses, statuses


def test_each_check_reports_its_own_time_apart_from_its_record(trained):
    results = run_checks(_ctx(trained), ["logits_not_probabilities", "large_eps_to_chance"])
    assert all(r.seconds >= 0.0 for r in results.values())
    assert set(results["large_eps_to_chance"].to_dict()) == {"id", "status", "detail", "raised_if", "remedy"}
