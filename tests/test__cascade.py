"""harden._cascade: the per-batch worst-case loop shared by verify and verify_onnx (cascade, caps, kept examples)."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import harden
import harden._cascade
from harden._cascade import prepared_attacks, run_cascade
from harden.attacks import ATTACKS
from harden.attacks.base import Attack
from harden.attacks.transfer import Transfer
from harden.policy import AttackSpec, ThreatModel
from harden.sampling import balanced_indices
from harden.testing import TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy
from harden.verify import verify

THREAT = ThreatModel(eps=0.1)
CPU = torch.device("cpu")


class Recorder(Attack):
    """Returns its input unchanged and records every batch it is asked to attack (not registered)."""

    name = "recorder"

    def __init__(self, threat):
        super().__init__(threat)
        self.seen = []

    def perturb(self, model, x, y):
        self.seen.append(x.clone())
        return x


def cascade(net, data, lp, other=(), caps=(), **kwargs):
    options = {"batch_size": 8, "limit": None, "desc": "test", "progress": False, **kwargs}
    return run_cascade(net, data, list(lp), list(other), list(caps), CPU, **options)


@torch.no_grad()
def predictions(model, x):
    return model(x).argmax(1)


def test_each_attack_sees_only_the_examples_still_robust(trained):
    x, y = synthetic_tensors(40, seed=5)
    fgsm, recorder = ATTACKS.get("fgsm")(THREAT), Recorder(THREAT)
    tally = cascade(trained, (x, y), [fgsm, recorder])
    survivors = (predictions(trained, x) == y) & (predictions(trained, fgsm(trained, x, y)) == y)
    assert 0 < int(survivors.sum()) < int((predictions(trained, x) == y).sum())  # fgsm broke some, not all
    assert torch.equal(torch.cat(recorder.seen), x[survivors])  # batch by batch, in data order
    result = tally.result
    assert result.labels == ["fgsm", "recorder"]
    assert torch.equal(result.robust, survivors)  # the identity attack breaks nothing more


def test_the_batched_cascade_equals_one_batch(trained):
    x, y = synthetic_tensors(40, seed=5)
    attacks = [ATTACKS.get("fgsm")(THREAT), ATTACKS.get("pgd")(THREAT, {"steps": 3, "random_start": False})]
    small = cascade(trained, (x, y), attacks, batch_size=7).result
    whole = cascade(trained, (x, y), attacks, batch_size=64).result
    assert small.broken_by == whole.broken_by
    assert torch.equal(small.robust, whole.robust) and torch.equal(small.clean_correct, whole.clean_correct)


def test_keep_adversarial_keeps_fooled_inputs_first_across_batches(trained):
    x, y = synthetic_tensors(48, seed=5)
    attacks = [ATTACKS.get("pgd")(THREAT, {"steps": 5, "random_start": False})]
    tally = cascade(trained, (x, y), attacks, keep_adversarial=1000)
    result = tally.result
    attacked = int(result.clean_correct.sum())
    fooled = attacked - int(result.robust.sum())
    assert 0 < fooled < attacked  # the test is not vacuous
    adv = tally.adversarial
    assert adv is not None and adv.shape == (attacked, 1, 8, 8) and adv.dtype == torch.float32
    owners = (adv.flatten(1)[:, None, :] - x.flatten(1)[None, :, :]).abs().amax(dim=2).argmin(dim=1)
    wrong = predictions(trained, adv) != y[owners]
    assert bool(wrong[:fooled].all()) and not bool(wrong[fooled:].any())  # every fooling input, then survivors
    few = cascade(trained, (x, y), attacks, keep_adversarial=3).adversarial
    assert few is not None and few.shape[0] == 3
    assert torch.equal(few, adv[:3])
    assert cascade(trained, (x, y), attacks).adversarial is None  # nothing kept by default


def test_attacks_outside_the_cascade_respect_their_cap_and_mark_the_rest_unmeasured(trained):
    x, y = synthetic_tensors(12, seed=5)
    inv = ATTACKS.get("invariance")(THREAT, {"angles": 3})
    noise = ATTACKS.get("noise")(THREAT, {"samples": 2})
    tally = cascade(trained, (x, y), [], [inv, noise], [5, None], batch_size=4)
    outcomes = tally.other_outcomes
    assert list(outcomes) == ["invariance", "noise"]
    assert len(outcomes["invariance"]) == 12 and outcomes["invariance"][5:] == [-1] * 7
    assert set(outcomes["invariance"][:5]) <= {0, 1}
    assert tally.other_n == {"invariance": 5, "noise": 12}
    assert tally.other_right["invariance"] == outcomes["invariance"].count(1)
    assert -1 not in outcomes["noise"] and tally.other_right["noise"] == outcomes["noise"].count(1)


def test_n_examples_caps_attacks_outside_the_lp_worst_case(trained):
    policy = tiny_policy(
        verify={
            "attacks": [{"name": "fgsm"}, {"name": "invariance", "params": {"angles": 3}, "n_examples": 20}],
            "checks": False,
            "eps_sweep": [],
        },
        data={"eval_batch_size": 16},
    )
    report = verify(trained, policy, synthetic_tensors(48, seed=5), progress=False)
    assert report.other_counts["invariance"] == 20
    assert report.n == 48


def test_n_examples_is_refused_on_cascade_attacks():
    with pytest.raises(harden.PolicyError, match="n_examples only on attacks outside"):
        tiny_policy(verify={"attacks": [{"name": "pgd", "n_examples": 5}]})


def test_check_examples_are_the_leading_examples_and_limit_stops_early(trained):
    x, y = synthetic_tensors(30, seed=5)
    tally = cascade(trained, (x, y), [ATTACKS.get("fgsm")(THREAT)], check_examples=11, limit=20)
    assert torch.equal(torch.cat(tally.check_x), x[:11]) and torch.equal(torch.cat(tally.check_y), y[:11])
    assert tally.result.clean_correct.shape == (20,)


def test_the_check_subsets_worst_case_inputs_are_the_suites_points_across_batches(trained):
    """check_adv: the fooling point where an attack fooled the example, the last attack's output where none did,
    the clean input where the model was wrong when clean; collected also when no adversarial input is kept."""
    x, y = synthetic_tensors(30, seed=5)
    y[[0, 9]] = (y[[0, 9]] + 1) % 3  # two wrong labels: the model is wrong on them when clean
    fgsm, recorder = ATTACKS.get("fgsm")(THREAT), Recorder(THREAT)
    tally = cascade(trained, (x, y), [fgsm, recorder], check_examples=19, batch_size=8)
    adv = torch.cat(tally.check_adv)
    assert adv.shape == x[:19].shape and tally.adversarial is None  # nothing kept for the report
    wrong, fooled = (predictions(trained, x[:19]) != y[:19]), tally.result.still_correct["fgsm"][:19].logical_not()
    fooled &= ~wrong
    held = ~(wrong | fooled)
    assert bool(wrong.any()) and bool(fooled.any()) and bool(held.any())  # every case occurs
    assert torch.equal(adv[wrong], x[:19][wrong])
    assert torch.equal(adv[held], x[:19][held])  # the recorder, the last attack, returns its input
    assert torch.equal(adv[fooled], fgsm(trained, x[:19][fooled], y[:19][fooled]))  # fgsm is deterministic
    assert bool((predictions(trained, adv[fooled]) != y[:19][fooled]).all())


def test_report_fields_follow_the_tally(trained):
    x, y = synthetic_tensors(24, seed=5)
    policy = tiny_policy()
    tally = cascade(trained, (x, y), [ATTACKS.get("fgsm")(THREAT)])
    fields = tally.report_fields(policy, policy.verify.attacks, seconds=1.5)
    result = tally.result
    assert fields["n"] == 24 and fields["seconds"] == 1.5 and fields["seed"] == policy.seed
    assert fields["clean_accuracy"] == int(result.clean_correct.sum()) / 24
    assert fields["robust_accuracy"] == int(result.robust.sum()) / 24
    assert sum(fields["broken_by"].values()) == 24 - int(result.robust.sum())
    assert fields["outcomes"]["broken_by"] == list(result.broken_by)


@pytest.mark.parametrize("data", [(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), "dataset"])
def test_no_examples_is_a_data_error(data):
    if data == "dataset":
        data = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(harden.DataError, match="at least one example"):
        cascade(TinyCNN(num_classes=3), data, [ATTACKS.get("fgsm")(THREAT)])


def test_bad_pixels_in_a_batch_are_a_data_error():
    x, y = synthetic_tensors(8)
    with pytest.raises(harden.DataError):
        cascade(TinyCNN(num_classes=3), (x * 255, y), [ATTACKS.get("fgsm")(THREAT)])


def test_prepared_attacks_orders_caps_and_hands_over_the_surrogate():
    specs = [
        AttackSpec(name="invariance", params={"angles": 3}, n_examples=7),
        AttackSpec(name="transfer", params={"steps": 2}),
        AttackSpec(name="fgsm"),
    ]
    surrogate = TinyCNN(num_classes=3).eval()
    lp, other, caps = prepared_attacks(specs, tiny_policy(), synthetic_bundle(), CPU, surrogate=surrogate)
    assert [a.name for a in lp] == ["fgsm", "transfer"]  # white-box first
    assert [a.name for a in other] == ["invariance"] and caps == [7]
    (transfer,) = [a for a in lp if isinstance(a, Transfer)]
    assert transfer.surrogate is surrogate  # given, not trained


def class_sorted(n=60, seed=5):
    x, y = synthetic_tensors(n, seed=seed)
    order = torch.argsort(y, stable=True)
    return x[order], y[order]


def test_a_balanced_cascade_verifies_a_seeded_class_balanced_sample_and_checks_a_balanced_subset(trained):
    x, y = class_sorted()
    tally = cascade(
        trained, (x, y), [ATTACKS.get("fgsm")(THREAT)], limit=30, check_examples=9, sample="balanced", seed=4
    )
    idx = balanced_indices(y, 30, 4)
    assert tally.indices == idx.tolist() and tally.sample == "balanced"
    assert tally.labels == y[idx].tolist() and torch.bincount(y[idx]).tolist() == [10, 10, 10]
    assert torch.equal(tally.result.clean_correct, predictions(trained, x[idx]) == y[idx])
    pos = balanced_indices(y[idx], 9, 4)
    assert [i for i, c in enumerate(tally.check) if c] == pos.tolist()
    assert torch.equal(torch.cat(tally.check_x), x[idx][pos]) and torch.equal(torch.cat(tally.check_y), y[idx][pos])
    first = cascade(trained, (x, y), [ATTACKS.get("fgsm")(THREAT)], limit=30, check_examples=9)
    assert first.indices == list(range(30)) and first.sample == "first"
    assert torch.bincount(torch.tensor(first.labels)).tolist() == [20, 10]  # class-sorted: 20 of class 0, then 1


def test_a_loader_in_order_gives_the_sample_a_tuple_gives_and_a_shuffled_one_is_taken_as_it_comes(trained):
    x, y = class_sorted()
    attacks = [ATTACKS.get("fgsm")(THREAT)]
    options = {"limit": 30, "check_examples": 9, "sample": "balanced", "seed": 4}
    pair = cascade(trained, (x, y), attacks, **options)
    loader = cascade(trained, DataLoader(TensorDataset(x, y), batch_size=7), attacks, **options)
    assert loader.indices == pair.indices and loader.result.broken_by == pair.result.broken_by
    assert torch.equal(torch.cat(loader.check_x), torch.cat(pair.check_x))
    shuffled = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    with pytest.warns(UserWarning, match="verified in its own order"):
        own = cascade(trained, shuffled, attacks, **options)
    assert own.sample == "first" and own.indices == list(range(30)) and sum(own.check) == 9


def test_report_fields_hold_per_class_counts_the_check_subset_and_the_indices(trained):
    x, y = class_sorted()
    policy = tiny_policy()
    tally = cascade(trained, (x, y), [ATTACKS.get("fgsm")(THREAT)], limit=30, check_examples=9, sample="balanced")
    fields = tally.report_fields(policy, policy.verify.attacks, 1.0, num_classes=4, class_names=("a", "b", "c"))
    result, labels = tally.result, torch.tensor(tally.labels)
    assert [c["label"] for c in fields["per_class"]] == [0, 1, 2, 3]  # every class of the model, one unseen
    assert [c["name"] for c in fields["per_class"]] == ["a", "b", "c", None]
    for c in fields["per_class"]:
        mine = labels == c["label"]
        assert c["n"] == int(mine.sum()) and c["clean"] == int(result.clean_correct[mine].sum())
        assert c["robust"] == int(result.robust[mine].sum())
    assert sum(c["n"] for c in fields["per_class"]) == fields["n"] == 30
    check = torch.tensor(tally.check)
    assert fields["check_n"] == 9
    assert fields["check_clean_accuracy"] == int(result.clean_correct[check].sum()) / 9
    assert fields["outcomes"]["indices"] == tally.indices and fields["sample"] == "balanced"


class RecordingBar:
    """Stands in for tqdm: records the total it ends with and what was counted."""

    bars: list = []

    def __init__(self, total=None, **_):
        self.total, self.n = total, 0
        RecordingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, k):
        self.n += k

    def refresh(self):
        self.positions = [*getattr(self, "positions", []), self.n]

    def set_postfix_str(self, s, refresh=True):
        self.labels = [*getattr(self, "labels", []), s]


@pytest.mark.parametrize("kind", ["tuple", "shuffled-loader"])
def test_the_bar_ends_full_when_the_data_holds_fewer_examples_than_the_limit(monkeypatch, trained, kind):
    # digits' test split holds 359 examples; verify.n_examples 360 once ended the bar at 359/360
    monkeypatch.setattr(harden._cascade, "tqdm", RecordingBar)
    RecordingBar.bars = []
    x, y = synthetic_tensors(359, seed=5)
    data = (x, y) if kind == "tuple" else DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shuffled loader's "taken in its own order"
        cascade(trained, data, [], limit=360, batch_size=64)
    (bar,) = RecordingBar.bars
    assert bar.n == bar.total == 359


class Ticking(Attack):
    """Returns its input unchanged after ticking a quarter, a half and three quarters (not registered)."""

    name = "ticking"

    def perturb(self, model, x, y):
        for done in (0.25, 0.5, 0.75):
            self.tick(done)
        return x


def test_the_bar_moves_within_a_batch_as_the_attacks_tick(monkeypatch, trained):
    monkeypatch.setattr(harden._cascade, "tqdm", RecordingBar)
    RecordingBar.bars = []
    x, y = synthetic_tensors(40, seed=5)
    noise = ATTACKS.get("noise")(THREAT, {"samples": 1})
    cascade(trained, (x, y), [Ticking(THREAT), Ticking(THREAT)], [noise], [None], batch_size=40)
    (bar,) = RecordingBar.bars
    # one batch of 40, three parts (two l_p attacks, one other): the bar rises in steps of 40/12 within it
    assert bar.positions[0] == 3 and bar.positions[-1] == bar.n == bar.total == 40
    assert bar.positions == sorted(bar.positions) and len(set(bar.positions)) >= 7
    assert {"ticking", "ticking#2", "noise"} <= set(bar.labels)
