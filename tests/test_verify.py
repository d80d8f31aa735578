"""harden.verify: the robustness report (worst case over the suite, seeded, modes kept, adversarial examples kept)."""

import contextlib
import copy
import importlib
import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import harden
import harden._cascade
import harden.checks
from harden.attacks.base import save_modes
from harden.checks import CHECKS
from harden.data import synthetic_bundle
from harden.sampling import balanced_indices
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


def class_sorted(n=90, seed=5):
    x, y = synthetic_tensors(n, seed=seed)
    order = torch.argsort(y, stable=True)
    return x[order], y[order]


@torch.no_grad()
def right(model, x, y):
    return model(x).argmax(1) == y


def test_verify_takes_a_seeded_class_balanced_sample_and_says_which_examples(trained):
    x, y = class_sorted()
    policy = fast_policy(verify={"n_examples": 30}, seed=3)
    report = verify(trained, policy, (x, y), progress=False)
    idx = balanced_indices(y, 30, 3)
    assert report.sample == "balanced" and report.outcomes["indices"] == idx.tolist()
    assert [c["n"] for c in report.per_class] == [10, 10, 10]
    clean = right(trained, x[idx], y[idx])
    assert [b != "clean" for b in report.outcomes["broken_by"]] == clean.tolist()  # outcomes follow the indices
    assert report.clean_accuracy == int(clean.sum()) / 30
    first = verify(trained, fast_policy(verify={"n_examples": 30, "sample": "first"}), (x, y), progress=False)
    assert first.sample == "first" and first.outcomes["indices"] == list(range(30))
    assert [c["n"] for c in first.per_class] == [30, 0, 0]  # class-sorted data: the first 30 are one class


def test_per_class_counts_add_up_and_take_the_bundles_names(trained):
    policy = fast_policy(verify={"n_examples": 60})
    report = verify(trained, policy, bundle=synthetic_bundle(), progress=False)
    assert [c["name"] for c in report.per_class] == ["class0", "class1", "class2"]
    assert [c["label"] for c in report.per_class] == [0, 1, 2]
    assert sum(c["n"] for c in report.per_class) == report.n == 60
    assert sum(c["clean"] for c in report.per_class) == round(report.clean_accuracy * 60)
    assert sum(c["robust"] for c in report.per_class) == round(report.robust_accuracy * 60)
    assert all(c["robust"] <= c["clean"] <= c["n"] for c in report.per_class)
    assert json.loads(json.dumps(report.to_dict()))["per_class"] == report.per_class
    summary = report.summary()
    assert "per class" in summary and "0 class0" in summary and "2 class2" in summary


def test_the_check_subset_is_balanced_and_its_clean_accuracy_is_the_eps_curves_first_point(trained):
    x, y = class_sorted()
    policy = tiny_policy(
        seed=2, verify={"n_examples": 45, "check_examples": 12, "check_steps": 2, "eps_sweep": [0.05, 0.1]}
    )
    report = verify(trained, policy, (x, y), progress=False)
    idx = balanced_indices(y, 45, 2)
    pos = balanced_indices(y[idx], 12, 2)
    cx, cy = x[idx][pos], y[idx][pos]
    assert report.check_n == 12 and torch.bincount(cy).tolist() == [4, 4, 4]
    assert report.check_clean_accuracy == int(right(trained, cx, cy).sum()) / 12
    assert report.eps_curve[0] == (0.0, report.check_clean_accuracy)
    assert [e for e, _ in report.eps_curve] == [0.0, 0.05, 0.1]
    summary = report.summary()
    subset = f"check subset, n=12, clean accuracy {report.check_clean_accuracy:.2%}"
    assert f"eps curve ({subset}): " in summary and f"sanity checks ({subset}):" in summary
    assert f"clean accuracy   {report.clean_accuracy:7.2%}  (n=45, class-balanced sample)" in summary


def test_checks_that_tested_nothing_skip_and_never_count_as_passes(trained):
    policy = tiny_policy(verify={"n_examples": 24, "check_examples": 12, "check_steps": 2, "eps_sweep": []})
    report = verify(trained, policy, synthetic_tensors(24, seed=5), progress=False)
    # no training history, and fgsm + pgd hold no black-box attack
    assert report.checks["no_catastrophic_overfitting"]["status"] == "SKIP"
    assert report.checks["white_box_beats_black_box"]["status"] == "SKIP"
    counts = report.check_counts()
    assert sum(counts.values()) == len(report.checks) and counts["SKIP"] >= 2
    verdict = "RELIABLE" if report.reliable else "UNRELIABLE"
    assert report.reliable == (counts["FAIL"] == 0)
    assert f"evaluation {verdict} ({counts['PASS']} checks pass" in report.summary()
    assert f"{counts['SKIP']} skipped, N/A)" in report.summary()
    assert "check SKIP (N/A) no_catastrophic_overfitting" in report.summary()


class Bars:
    """Stands in for tqdm in every verification module: records each bar's label, total and count."""

    def __init__(self):
        self.made = []

    def __call__(self, total=None, desc="", disable=False, **_):
        bar = _Bar(total, desc, disable)
        self.made.append(bar)
        return bar


class _Bar:
    def __init__(self, total, desc, disable):
        self.total, self.desc, self.disable, self.n = total, desc, disable, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, k):
        self.n += k

    def refresh(self):
        pass

    def set_postfix_str(self, *_, **__):
        pass


def test_the_eps_sweep_and_the_checks_show_a_named_bar_after_the_attacks(monkeypatch, trained):
    bars = Bars()
    for module in (harden._cascade, importlib.import_module("harden.verify"), harden.checks):
        monkeypatch.setattr(module, "tqdm", bars)
    policy = tiny_policy(verify={"n_examples": 20, "check_examples": 8, "check_steps": 1, "eps_sweep": [0.05, 0.1]})
    verify(trained, policy, synthetic_tensors(20, seed=5), progress=True)
    made = [(b.desc, b.total, b.n, b.disable) for b in bars.made]
    assert made[0] == ("verify", 20, 20, False)
    assert ("eps sweep", 2, 2, False) in made and ("checks", len(CHECKS), len(CHECKS), False) in made
    bars.made.clear()
    verify(trained, policy, synthetic_tensors(20, seed=5), progress=False)
    assert bars.made and all(b.disable for b in bars.made)


def test_user_data_loads_the_policys_data_for_the_invariance_pool(monkeypatch, trained):
    loads = []
    real = harden._cascade.load_data
    monkeypatch.setattr(harden._cascade, "load_data", lambda spec: loads.append(spec.name) or real(spec))
    attacks = [{"name": "fgsm"}, {"name": "invariance_examples", "params": {"angles": 3, "shifts": 3}}]
    report = verify(trained, fast_policy(verify={"attacks": attacks}), synthetic_tensors(24, seed=5), progress=False)
    assert loads == ["synthetic"] and report.other_counts["invariance_examples"] == 24
    loads.clear()
    verify(trained, fast_policy(), synthetic_tensors(24, seed=5), progress=False)
    assert loads == []  # no attack reads the training split: nothing is loaded


def test_user_data_without_the_policys_data_falls_back_or_says_why_in_one_line(trained):
    unloadable = {"name": "cifar10"}  # no data.root: it cannot load
    attacks = [{"name": "fgsm"}, {"name": "invariance_examples", "params": {"angles": 3, "shifts": 3}}]
    policy = fast_policy(data=unloadable, verify={"attacks": attacks})
    with pytest.warns(UserWarning, match="invariance_examples searches the attacked batch"):
        report = verify(trained, policy, synthetic_tensors(24, seed=5), progress=False)
    assert 0.0 <= report.other_threats["invariance_examples"] <= 1.0
    policy = fast_policy(data=unloadable, verify={"attacks": [{"name": "transfer", "params": {"epochs": 1}}]})
    with pytest.raises(harden.DataError, match=r"transfer attack's surrogate .*data\.root.*pass bundle=") as info:
        verify(trained, policy, synthetic_tensors(24, seed=5), progress=False)
    assert "\n" not in str(info.value)


def test_a_head_of_the_wrong_size_is_blamed_on_the_model_not_the_data():
    from harden.errors import ModelError
    from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

    x, y = synthetic_tensors(24)  # labels 0..2
    with pytest.raises(ModelError, match=r"at least 3 logits .* got 2: set model.num_classes"):
        verify(TinyCNN(num_classes=2), tiny_policy(verify={"checks": False}), (x, y), progress=False)


def test_the_report_says_where_the_time_went_and_what_each_check_cost(trained):
    policy = tiny_policy(verify={"n_examples": 30, "check_examples": 12, "check_steps": 2, "eps_sweep": [0.05, 0.1]})
    report = verify(trained, policy, synthetic_tensors(30, seed=5), progress=False)
    assert set(report.per_check_seconds) == set(report.checks) == set(CHECKS)
    assert all(v >= 0.0 for v in report.per_check_seconds.values())
    # each check's interval lies within the checks' one (same clock); 1e-9 s covers float addition
    assert sum(report.per_check_seconds.values()) <= report.check_seconds + 1e-9
    split = report.time_split()
    assert list(split) == ["attacks", "other_attacks", "setup", "checks", "eps_sweep", "rest"]
    assert split["checks"] == report.check_seconds and split["eps_sweep"] == report.sweep_seconds
    assert split["attacks"] == sum(report.attack_seconds.values()) and all(v >= 0.0 for v in split.values())
    assert abs(sum(split.values()) - report.seconds) <= 1e-9  # the parts add up to verify's wall time
    assert report.to_dict()["per_check_seconds"] == report.per_check_seconds
    assert f"time {report.seconds:.1f} s: " in report.summary()
    cost = report.per_check_seconds["more_iterations_never_help"]
    assert f"{report.checks['more_iterations_never_help']['detail']} ({cost:.1f} s)" in report.summary()


def test_the_eps_curve_never_rises_and_its_run_at_eps_is_the_checks_base_run(trained):
    policy = tiny_policy(
        verify={"n_examples": 45, "check_examples": 30, "check_steps": 3, "eps_sweep": [0.025, 0.05, 0.1, 0.2]}
    )
    report = verify(trained, policy, synthetic_tensors(45, seed=5), progress=False)
    accs = [a for _, a in report.eps_curve]
    assert all(b <= a for a, b in itertools.pairwise(accs)), report.eps_curve  # warm starts: fooled stays fooled
    assert accs[0] > accs[-1]  # it falls, so the comparison above tests something
    at_eps = dict(report.eps_curve)[0.1]
    detail = report.checks["more_iterations_never_help"]["detail"]
    assert detail.startswith(f"the suite {at_eps:.1%}, +3 steps ")  # says what its base run was


def test_the_eps_curve_at_the_threats_eps_is_the_suites_own_figure(trained):
    """Every verified example in the check subset: the curve's point at eps is the robust accuracy, not a new run."""
    policy = tiny_policy(verify={"n_examples": 30, "check_examples": 30, "eps_sweep": [0.05, 0.1, 0.2]})
    report = verify(trained, policy, synthetic_tensors(30, seed=5), progress=False)
    assert report.check_n == report.n == 30
    assert dict(report.eps_curve)[0.1] == report.robust_accuracy
    assert 0.0 < report.robust_accuracy < report.clean_accuracy  # the suite fooled some, not all
