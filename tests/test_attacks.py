"""Attacks: the contract every registered attack keeps, then PGD/FGSM specifics and the suite."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harden
from harden.attacks import ATTACKS, build_attack, lp_norm, project, run_suite
from harden.attacks.base import restore_modes, save_modes
from harden.policy import AttackSpec, ThreatModel
from harden.testing import TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy

#: cheap values for the budget parameters an attack may have (applied when its Params has the field)
CHEAP = {
    "steps": 5,
    "restarts": 1,
    "samples": 3,
    "n_queries": 40,
    "queries": 40,
    "n_target_classes": 2,
    "epochs": 1,
    "angles": 3,
    "shifts": 3,
    "iterations": 5,
}
#: per-attack overrides of CHEAP
FAST_PARAMS = {"pgd": {"steps": 5}, "transfer": {"steps": 3}}

THREATS = [ThreatModel(norm="linf", eps=0.1), ThreatModel(norm="l2", eps=0.5)]


_PREPARED = {}


def make_attack(name, threat, device="cpu", **params):
    """A cheap instance of a registered attack, prepared once (e.g. a transfer surrogate trained) for ``device``."""
    cls = ATTACKS.get(name)
    cheap = {k: v for k, v in CHEAP.items() if k in cls.Params.model_fields}
    params = {**cheap, **FAST_PARAMS.get(name, {}), **params}
    key = (name, threat.norm, threat.eps, device, tuple(sorted(params.items())))
    if key not in _PREPARED:
        attack = cls(threat, params)
        prepare = getattr(attack, "prepare", None)
        if prepare is not None:
            from harden.attacks.base import AttackEnv

            env = AttackEnv(
                policy=tiny_policy(threat=threat.model_dump()), bundle=synthetic_bundle(), device=torch.device(device)
            )
            with torch.random.fork_rng(devices=[]):
                prepare(env)
        _PREPARED[key] = attack
    return _PREPARED[key]


def fresh_model(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return TinyCNN(num_classes=num_classes)


@pytest.fixture(scope="module")
def trained():
    """A TinyCNN trained a few seeded steps on synthetic data, and held-out data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=3)
        x, y = synthetic_tensors(384, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for _ in range(3):
            for i in range(0, 384, 64):
                opt.zero_grad()
                F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
        model.eval()
    x_test, y_test = synthetic_tensors(96, seed=2)
    return model, x_test, y_test


@torch.no_grad()
def acc(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def no_grads(model):
    return all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- the contract

CONTRACT = pytest.mark.parametrize("name", ATTACKS.names())


@CONTRACT
@pytest.mark.parametrize("threat", THREATS, ids=["linf", "l2"])
def test_output_like_input_inside_ball_and_box(name, threat):
    model = fresh_model()
    x, y = synthetic_tensors(16)
    x0 = x.clone()
    attack = make_attack(name, threat)
    adv = attack(model, x, y)
    assert adv.shape == x.shape
    assert adv.dtype == x.dtype
    assert adv.device == x.device
    assert not adv.requires_grad
    assert torch.equal(x, x0)  # the input is not modified in place
    assert float(adv.min()) >= 0.0
    assert float(adv.max()) <= 1.0
    if type(attack).bounded:
        dist = lp_norm(adv - x, threat.norm)
        assert float(dist.max()) <= threat.eps * (1 + 1e-5) + 1e-6
    assert no_grads(model)


@CONTRACT
def test_train_mode_is_restored(name):
    model = fresh_model()
    model.train()
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    make_attack(name, THREATS[0])(model, *synthetic_tensors(8))
    assert all(m.training for m in model.modules())
    # the attack ran in eval mode: BatchNorm statistics were not updated by its forward passes
    assert torch.equal(bn.running_mean, stats[0])
    assert torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]


@CONTRACT
def test_mixed_modes_are_restored(name):
    model = fresh_model()
    model.train()
    model.features[1].eval()  # e.g. a frozen BatchNorm
    before = save_modes(model)
    assert not all(before.values()) and any(before.values())
    make_attack(name, THREATS[0])(model, *synthetic_tensors(8))
    assert save_modes(model) == before


@CONTRACT
def test_eval_mode_stays_eval(name):
    model = fresh_model().eval()
    make_attack(name, THREATS[0])(model, *synthetic_tensors(8))
    assert not any(m.training for m in model.modules())


def test_attacks_run_the_model_in_eval_mode():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(num_classes=3)

        def forward(self, x):
            seen.append((self.training, self.net.features[1].training))
            return self.net(x)

    model = Spy().train()
    for name in ATTACKS.names():
        make_attack(name, THREATS[0])(model, *synthetic_tensors(8))
    assert seen
    assert not any(a or b for a, b in seen)
    assert model.training and model.net.features[1].training


class Flaky(nn.Module):
    """TinyCNN that raises on its ``fail_at``-th forward call."""

    def __init__(self, fail_at):
        super().__init__()
        self.net = TinyCNN(num_classes=3)
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom inside forward")
        return self.net(x)


@CONTRACT
def test_modes_restored_when_forward_raises(name):
    model = Flaky(fail_at=1)
    model.train()
    model.net.head.eval()
    before = save_modes(model)
    attack = make_attack(name, THREATS[0])
    try:
        attack(model, *synthetic_tensors(8))
    except RuntimeError as exc:
        assert "boom inside forward" in str(exc)
    else:
        assert model.calls == 0  # only an attack that never runs the target (e.g. transfer) gets here
    assert save_modes(model) == before
    assert no_grads(model)


def test_pgd_modes_restored_when_forward_raises_mid_attack():
    model = Flaky(fail_at=2)
    model.train()
    model.net.features[1].eval()
    before = save_modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        make_attack("pgd", THREATS[0], steps=4)(model, *synthetic_tensors(8))
    assert model.calls == 2
    assert save_modes(model) == before


@CONTRACT
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, y: (x + 0.5, y), r"pixels in \[0, 1\]"),
        (lambda x, y: (x - 0.5, y), r"pixels in \[0, 1\]"),
        (lambda x, y: (x.index_fill(0, torch.tensor([2]), float("nan")), y), r"pixels in \[0, 1\]"),
        (lambda x, y: (x.double(), y), "float32"),
        (lambda x, y: (x.half(), y), "float32"),
        (lambda x, y: (x[0], y), "NCHW"),
        (lambda x, y: (x[:0], y[:0]), "non-empty"),
        (lambda x, y: (x, y[:-1]), "integer labels"),
        (lambda x, y: (x, y.float()), "integer labels"),
        (lambda x, y: (x, y.view(-1, 1)), "integer labels"),
    ],
    ids=[
        "above-one",
        "negative",
        "nan",
        "float64",
        "float16",
        "3d",
        "empty",
        "label-count",
        "float-labels",
        "2d-labels",
    ],
)
def test_threat_model_violations_raise(name, mutate, match):
    x, y = mutate(*synthetic_tensors(8))
    with pytest.raises(harden.ThreatModelError, match=match):
        make_attack(name, THREATS[0])(fresh_model(), x, y)


@CONTRACT
def test_not_a_module_raises(name):
    with pytest.raises(harden.ThreatModelError, match=r"nn\.Module"):
        make_attack(name, THREATS[0])(lambda x: x, *synthetic_tensors(4))


def test_bad_threat_or_params_raise():
    with pytest.raises(harden.ThreatModelError, match="ThreatModel"):
        ATTACKS.get("pgd")({"eps": 0.1})
    with pytest.raises(harden.PolicyError, match="steps"):
        ATTACKS.get("pgd")(ThreatModel(), {"steps": 0})
    with pytest.raises(harden.PolicyError):
        ATTACKS.get("fgsm")(ThreatModel(), {"steps": 3})


@CONTRACT
@pytest.mark.parametrize("threat", THREATS, ids=["linf", "l2"])
def test_same_result_under_the_same_seed(name, threat):
    model = fresh_model().eval()
    x, y = synthetic_tensors(16)
    attack = make_attack(name, threat)
    torch.manual_seed(7)
    a = attack(model, x, y)
    torch.manual_seed(7)
    b = attack(model, x, y)
    assert torch.equal(a, b)


@CONTRACT
def test_no_parameter_grads_accumulate(name):
    model = fresh_model()
    make_attack(name, THREATS[0])(model, *synthetic_tensors(8))
    assert no_grads(model)
    # existing grads are left untouched too
    model(synthetic_tensors(4)[0]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    make_attack(name, THREATS[0])(model, *synthetic_tensors(8))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


@CONTRACT
def test_inputs_already_on_the_box_edge(name):
    model = fresh_model()
    x = torch.zeros(4, 1, 8, 8)
    x[2:] = 1.0
    adv = make_attack(name, THREATS[0])(model, x, torch.tensor([0, 1, 2, 0]))
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


@pytest.mark.gpu
@CONTRACT
def test_device_mismatch_raises_and_cuda_stays_on_cuda(name):
    model = fresh_model().cuda()
    x, y = synthetic_tensors(8)
    attack = make_attack(name, THREATS[0], device="cuda")  # a transfer surrogate prepared on the GPU
    with pytest.raises(harden.ThreatModelError, match="one device"):
        attack(model, x, y)
    adv = attack(model, x.cuda(), y.cuda())
    assert adv.device.type == "cuda"
    if ATTACKS.get(name).bounded and not ATTACKS.get(name).changes_label:
        # the linf projection in float32: one rounding of x + delta (|x| <= 1) adds at most 2**-24
        assert float((adv - x.cuda()).abs().max()) <= THREATS[0].eps + 1e-6


# --------------------------------------------------------------------------- projection


def test_project_linf_and_l2():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 4, 4)
    far = torch.rand(6, 1, 4, 4) * 3 - 1
    p = project(far, x, "linf", 0.05)
    assert float((p - x).abs().max()) <= 0.05 + 1e-7
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    p2 = project(far, x, "l2", 0.3)
    assert float(lp_norm(p2 - x, "l2").max()) <= 0.3 * (1 + 1e-6)
    assert float(p2.min()) >= 0 and float(p2.max()) <= 1
    near = (x + 0.001).clamp(0, 1)
    torch.testing.assert_close(project(near, x, "l2", 0.3), near)


# --------------------------------------------------------------------------- PGD / FGSM


def test_trained_model_is_accurate(trained):
    model, x, y = trained
    assert acc(model, x, y) >= 0.9


def test_pgd_lowers_accuracy(trained):
    model, x, y = trained
    clean = acc(model, x, y)
    adv = make_attack("pgd", ThreatModel(eps=0.1), steps=10)(model, x, y)
    assert acc(model, adv, y) < clean - 0.2


def test_pgd_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.1)
    fgsm = acc(model, make_attack("fgsm", threat)(model, x, y), y)
    pgd = acc(model, make_attack("pgd", threat, steps=20)(model, x, y), y)
    assert fgsm < acc(model, x, y)
    assert pgd <= fgsm


def test_fgsm_is_deterministic_and_one_step(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.05)
    adv = make_attack("fgsm", threat)(model, x, y)
    moved = (adv - x).abs()
    inside = (x > 0.05) & (x < 0.95)
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], 0.05), atol=1e-6)  # sign step, full eps
    assert torch.equal(adv, make_attack("fgsm", threat)(model, x, y))


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.6)])
def test_restarts_never_increase_accuracy(trained, norm, eps):
    model, x, y = trained
    threat = ThreatModel(norm=norm, eps=eps)
    results = []
    for restarts in (1, 2, 5):
        torch.manual_seed(3)
        adv = make_attack("pgd", threat, steps=3, restarts=restarts)(model, x, y)
        results.append(acc(model, adv, y))
    assert results[0] < acc(model, x, y)
    assert results[2] <= results[1] <= results[0]


def test_more_steps_do_not_help_the_model(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.1)
    torch.manual_seed(1)
    few = acc(model, make_attack("pgd", threat, steps=2, random_start=False)(model, x, y), y)
    torch.manual_seed(1)
    many = acc(model, make_attack("pgd", threat, steps=20, random_start=False)(model, x, y), y)
    assert many <= few


def test_pgd_l2_norm_bound_and_effect(trained):
    model, x, y = trained
    threat = ThreatModel(norm="l2", eps=1.0)
    adv = make_attack("pgd", threat, steps=10)(model, x, y)
    norms = lp_norm(adv - x, "l2")
    assert float(norms.max()) <= 1.0 * (1 + 1e-5)
    assert float(norms.max()) > 0.5  # it uses the budget
    assert acc(model, adv, y) < acc(model, x, y)


def test_pgd_kl_loss_and_last_select(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.1)
    for params in ({"loss": "kl"}, {"select": "last"}):
        adv = make_attack("pgd", threat, steps=3, **params)(model, x, y)
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert not torch.equal(adv, x)


def test_misclassified_select_keeps_fooling_iterates(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.1)
    torch.manual_seed(0)
    best = acc(model, make_attack("pgd", threat, steps=5)(model, x, y), y)
    torch.manual_seed(0)
    last = acc(model, make_attack("pgd", threat, steps=5, select="last")(model, x, y), y)
    assert best <= last


# --------------------------------------------------------------------------- the suite


def suite_attacks(threat, random_start):
    return [
        build_attack(AttackSpec(name="fgsm"), threat),
        build_attack(AttackSpec(name="pgd", params={"steps": 10, "random_start": random_start}), threat),
        build_attack(AttackSpec(name="pgd", params={"steps": 10, "random_start": random_start}), threat),
    ]


def check_suite_consistency(result, x):
    n = x.shape[0]
    assert result.labels == ["fgsm", "pgd", "pgd#2"]
    assert len(result.broken_by) == n
    assert result.clean_correct.shape == (n,)
    accs = [float(result.clean_correct.float().mean())] + [
        float(result.still_correct[k].float().mean()) for k in result.labels
    ]
    assert all(b <= a for a, b in itertools.pairwise(accs))  # non-increasing
    assert torch.equal(result.robust, result.still_correct["pgd#2"])
    prev = result.clean_correct
    for label in result.labels:
        now = result.still_correct[label]
        assert not (now & ~prev).any()  # nobody comes back to life
        broken_here = [i for i in range(n) if prev[i] and not now[i]]
        assert broken_here == [i for i, b in enumerate(result.broken_by) if b == label]
        prev = now
    for i, b in enumerate(result.broken_by):
        assert (b == "clean") == (not result.clean_correct[i])
        assert (b == "") == bool(result.robust[i])


def test_suite_deterministic_attacks_equal_the_and_of_standalone(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.1)
    attacks = suite_attacks(threat, random_start=False)
    result = run_suite(model, x, y, attacks)
    check_suite_consistency(result, x)
    standalone = torch.ones_like(y, dtype=torch.bool)
    with torch.no_grad():
        standalone &= model(x).argmax(1) == y
        for attack in attacks:
            standalone &= model(attack(model, x, y)).argmax(1) == y
    assert torch.equal(result.robust, standalone)
    # the test is not vacuous: both attacks break examples, some survive
    assert result.broken_by.count("fgsm") > 0
    assert result.broken_by.count("pgd") > 0
    assert 0 < int(result.robust.sum()) < int(result.clean_correct.sum())


def test_suite_with_random_starts_is_at_least_each_standalone(trained):
    model, x, y = trained
    threat = ThreatModel(eps=0.1)
    attacks = suite_attacks(threat, random_start=True)
    torch.manual_seed(0)
    result = run_suite(model, x, y, attacks)
    check_suite_consistency(result, x)
    robust = float(result.robust.float().mean())
    for attack in attacks:
        torch.manual_seed(0)
        assert robust <= acc(model, attack(model, x, y), y)
    assert robust < float(result.clean_correct.float().mean())


def test_suite_restores_modes_when_an_attack_raises():
    model = Flaky(fail_at=2)  # the clean prediction is call 1, the first attack's forward call 2
    model.train()
    model.net.features[1].eval()
    before = save_modes(model)
    x, y = synthetic_tensors(8)
    with pytest.raises(RuntimeError, match="boom"):
        run_suite(model, x, y, suite_attacks(ThreatModel(eps=0.1), random_start=False))
    assert save_modes(model) == before


def test_suite_restores_modes_and_extends(trained):
    model, x, y = trained
    model.train()
    model.features[1].eval()
    before = save_modes(model)
    try:
        attacks = suite_attacks(ThreatModel(eps=0.1), random_start=False)
        first = run_suite(model, x[:40], y[:40], attacks)
        assert save_modes(model) == before
        second = run_suite(model, x[40:], y[40:], attacks)
        first.extend(second)
        whole = run_suite(model, x, y, attacks)
    finally:
        restore_modes(model, {name: False for name in before})
    assert first.broken_by == whole.broken_by
    assert torch.equal(first.robust, whole.robust)
    assert set(first.seconds) == set(whole.labels)
