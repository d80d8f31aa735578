"""harden.fit: learning, run-directory layout, history, exact resume, user models and data."""

import json

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.checkpoint import sha256_file
from harden.objectives import OBJECTIVES, Objective
from harden.policy_io import validate_policy
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy
from harden.train import MAX_BAD_STEPS

HISTORY_KEYS = {"epoch", "lr", "train_loss", "val_clean_acc", "val_pgd_acc", "seconds", "skipped_steps"}


def fit(policy, run_dir, model=None, **kwargs):
    return harden.fit(model, policy, run_dir=run_dir, progress=False, **kwargs)


def test_fit_learns_and_writes_the_run_directory(tmp_run):
    policy = tiny_policy(train={"epochs": 2, "keep_checkpoints": 5})
    seen = []
    result = fit(policy, tmp_run, on_epoch_end=seen.append)
    assert isinstance(result, harden.FitResult)
    assert isinstance(result.model, harden.Normalized)
    assert not result.model.training
    assert result.run_dir == tmp_run
    assert result.resumed_from is None
    assert result.history[-1]["val_clean_acc"] > 0.6  # 3 classes: chance is 1/3
    ck = tmp_run / "checkpoints"
    for epoch in (1, 2):
        assert (ck / f"epoch-{epoch:04d}.safetensors").is_file()
        assert (ck / f"epoch-{epoch:04d}.json").is_file()
    assert result.weights == tmp_run / "model.safetensors"
    assert result.weights.is_file()
    meta = json.loads((tmp_run / "model.json").read_text())
    assert meta["sha256"] == sha256_file(result.weights)
    assert meta["policy_hash"] == harden.policy_hash(policy)
    assert validate_policy(yaml.safe_load((tmp_run / "policy.yaml").read_text())) == policy
    assert not list(tmp_run.rglob("*.tmp"))
    assert seen == result.history


def test_history_records(tmp_run):
    policy = tiny_policy(train={"epochs": 2})
    history = fit(policy, tmp_run).history
    assert [r["epoch"] for r in history] == [1, 2]
    for record in history:
        assert set(record) == HISTORY_KEYS
        assert 0.0 <= record["val_clean_acc"] <= 1.0
        assert 0.0 <= record["val_pgd_acc"] <= 1.0
        assert record["skipped_steps"] == 0
        assert record["seconds"] > 0
        assert record["train_loss"] > 0
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0


def test_checkpoints_are_pruned(tmp_run):
    fit(
        tiny_policy(train={"epochs": 3, "keep_checkpoints": 1, "probe_examples": 0}, objectives=[{"name": "ce"}]),
        tmp_run,
    )
    assert sorted(p.name for p in (tmp_run / "checkpoints").iterdir()) == ["epoch-0003.json", "epoch-0003.safetensors"]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_resume_continues_exactly(tmp_path):
    train = {"schedule": "constant", "probe_examples": 32}  # the lr must not depend on the total epochs
    first = fit(tiny_policy(train={**train, "epochs": 2}), tmp_path / "resumed")
    assert first.resumed_from is None
    resumed = fit(tiny_policy(train={**train, "epochs": 3}), tmp_path / "resumed", resume=True)
    straight = fit(tiny_policy(train={**train, "epochs": 3}), tmp_path / "straight")
    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history
    assert_same_weights(resumed.model, straight.model)
    for key in ("train_loss", "val_clean_acc", "val_pgd_acc", "lr"):
        assert resumed.history[-1][key] == straight.history[-1][key]
    assert sha256_file(resumed.weights) == sha256_file(straight.weights)


def test_resume_keeps_the_phase_of_lazy_objectives(tmp_path):
    # 6 steps an epoch (384 synthetic images, batches of 64): every 4 straddles the epoch boundary
    train = {"schedule": "constant", "probe_examples": 0}
    objectives = [{"name": "ce"}, {"name": "trades", "weight": 0.5, "params": {"steps": 2}, "every": 4}]
    fit(tiny_policy(train={**train, "epochs": 1}, objectives=objectives), tmp_path / "resumed")
    resumed = fit(tiny_policy(train={**train, "epochs": 2}, objectives=objectives), tmp_path / "resumed", resume=True)
    straight = fit(tiny_policy(train={**train, "epochs": 2}, objectives=objectives), tmp_path / "straight")
    assert resumed.resumed_from == 1
    assert_same_weights(resumed.model, straight.model)
    assert resumed.history[-1]["loss_1_trades"] == straight.history[-1]["loss_1_trades"]


def test_fit_hands_every_to_the_objectives(tmp_run, monkeypatch):
    seen = []

    class Spy(harden.objectives.ObjectiveSet):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("every"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("harden.fit_setup.ObjectiveSet", Spy)
    objectives = [
        {"name": "ce"},
        {"name": "trades", "weight": 0.0},
        {"name": "trades", "params": {"steps": 1}, "every": 4},
    ]
    fit(tiny_policy(train={"probe_examples": 0}, objectives=objectives), tmp_run)
    assert seen == [[1, 4]]  # the weight-0 objective is left out, with its every


def test_resume_without_checkpoints_starts_from_scratch(tmp_run):
    policy = tiny_policy(objectives=[{"name": "ce"}])
    resumed = fit(policy, tmp_run, resume=True)
    assert resumed.resumed_from is None
    assert len(resumed.history) == 1


def test_resume_skips_a_corrupt_checkpoint(tmp_run):
    policy = tiny_policy(train={"epochs": 2, "schedule": "constant"}, objectives=[{"name": "ce"}])
    fit(policy, tmp_run)
    blob = tmp_run / "checkpoints" / "epoch-0002.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="epoch-0002"):
        again = fit(policy, tmp_run, resume=True)
    assert again.resumed_from == 1
    assert [r["epoch"] for r in again.history] == [1, 2]


def test_resume_under_an_edited_policy_warns(tmp_run):
    train = {"epochs": 2, "schedule": "constant", "probe_examples": 0}
    fit(tiny_policy(train=train, objectives=[{"name": "ce"}]), tmp_run)
    edited = tiny_policy(train={**train, "epochs": 3, "lr": 0.01}, objectives=[{"name": "ce"}])
    with pytest.warns(RuntimeWarning, match="written under another policy"):
        again = fit(edited, tmp_run, resume=True)
    assert again.resumed_from == 2
    assert [r["epoch"] for r in again.history] == [1, 2, 3]


def test_resume_with_another_model_is_a_checkpoint_error(tmp_run):
    train = {"epochs": 1, "probe_examples": 0}
    fit(tiny_policy(train=train, objectives=[{"name": "ce"}]), tmp_run)
    wider = tiny_policy(train={**train, "epochs": 2}, objectives=[{"name": "ce"}], model={"args": {"width": 24}})
    with pytest.raises(
        harden.CheckpointError, match=r"epoch 1 .* size mismatch .* resume only with the policy that wrote it"
    ):
        fit(wider, tmp_run, resume=True)


def test_user_module_and_datasets(tmp_run):
    torch.manual_seed(0)
    user = TinyCNN(num_classes=3)
    train = TensorDataset(*synthetic_tensors(192, seed=1))
    val = TensorDataset(*synthetic_tensors(64, seed=2))
    policy = tiny_policy(train={"epochs": 2}, objectives=[{"name": "ce"}])
    before = user.head.weight.detach().clone()
    result = fit(policy, tmp_run, model=user, train=train, val=val)
    assert result.model.model is user  # trained in place, wrapped once
    assert not torch.equal(user.head.weight, before)
    assert all(p.device.type == "cpu" for p in user.parameters())
    assert result.history[-1]["val_clean_acc"] > 0.6


def test_user_dataloader_without_val(tmp_run):
    loader = DataLoader(TensorDataset(*synthetic_tensors(96, seed=1)), batch_size=32, shuffle=False)
    policy = tiny_policy(objectives=[{"name": "ce"}])
    result = fit(policy, tmp_run, model=TinyCNN(num_classes=3), train=loader)
    (record,) = result.history
    assert "val_clean_acc" not in record
    assert record["train_loss"] > 0


def test_model_none_with_user_data_raises(tmp_run):
    with pytest.raises(harden.DataError, match="expected a model"):
        fit(tiny_policy(), tmp_run, train=TensorDataset(*synthetic_tensors(8)))


def test_bad_batches_are_refused(tmp_run):
    x, y = synthetic_tensors(32)
    with pytest.raises(harden.DataError, match=r"pixels in \[0, 1\]"):
        fit(
            tiny_policy(objectives=[{"name": "ce"}]),
            tmp_run,
            model=TinyCNN(num_classes=3),
            train=TensorDataset(x * 255, y),
        )


@pytest.fixture
def nan_objective():
    name = "test_always_nan"

    class AlwaysNaN(Objective):
        def loss(self, ctx):
            return ctx.logits(None).sum() * float("nan")

    AlwaysNaN.name = name
    OBJECTIVES.add(name, AlwaysNaN)
    yield name
    OBJECTIVES._entries.pop(name, None)


def test_always_nan_loss_aborts_naming_the_objective(tmp_run, nan_objective):
    # batch 16 on 384 examples: 24 steps per epoch, so MAX_BAD_STEPS fall inside the first epoch
    policy = tiny_policy(data={"batch_size": 16}, objectives=[{"name": "ce", "weight": 0.5}, {"name": nan_objective}])
    with pytest.raises(harden.HardenError, match=nan_objective) as info:
        fit(policy, tmp_run)
    assert f"{MAX_BAD_STEPS} non-finite in a row" in str(info.value)
    assert "'ce'" not in str(info.value)  # only the objective that went bad is named


def test_always_nan_loss_aborts_across_epochs(tmp_run, nan_objective):
    # batch 64 on 384 examples: 6 steps per epoch, 12 bad steps over two epochs
    policy = tiny_policy(train={"epochs": 2}, objectives=[{"name": nan_objective}])
    with pytest.raises(harden.HardenError, match=nan_objective):
        fit(policy, tmp_run)


@pytest.mark.parametrize(
    ("train", "final_lr"),
    [
        ({"schedule": "constant"}, 0.05),
        ({"schedule": "cosine"}, 0.0),
        ({"schedule": "step", "milestones": [1], "gamma": 0.1}, 0.005),
        ({"schedule": "constant", "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01}, 0.003),
        ({"schedule": "cosine", "warmup_epochs": 0.5, "grad_clip": 1.0}, 0.0),
    ],
    ids=["constant", "cosine", "step", "adamw", "warmup-clip"],
)
def test_schedules_and_optimizers(tmp_run, train, final_lr):
    policy = tiny_policy(train={"epochs": 2, "probe_examples": 0, **train}, objectives=[{"name": "ce"}])
    result = fit(policy, tmp_run)
    assert result.history[-1]["lr"] == pytest.approx(final_lr, abs=1e-9)
    assert result.history[-1]["val_clean_acc"] > 0.5
    assert all(r["skipped_steps"] == 0 for r in result.history)


def refuse_load_data(monkeypatch):
    def refuse(spec):
        raise AssertionError("load_data was called although a bundle was given")

    monkeypatch.setattr("harden.train.load_data", refuse)


def test_fit_with_a_bundle_does_not_load_data_and_trains_the_same(tmp_path, monkeypatch):
    policy = tiny_policy(train={"epochs": 2})
    bundle = harden.data.load_data(policy.data)
    loaded = fit(policy, tmp_path / "loaded")
    refuse_load_data(monkeypatch)
    given = fit(policy, tmp_path / "given", bundle=bundle)
    assert_same_weights(given.model, loaded.model)
    for a, b in zip(given.history, loaded.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    model, same = harden.train.load_trained(policy, given.weights, bundle=bundle)
    assert same is bundle
    assert_same_weights(model, given.model)


def test_fit_with_a_bundle_and_a_user_model_validates_on_its_test_split(tmp_run, monkeypatch):
    refuse_load_data(monkeypatch)
    bundle = harden.testing.synthetic_bundle(n_train=96, n_test=32)
    policy = tiny_policy(train={"probe_examples": 0}, objectives=[{"name": "ce"}])
    result = fit(policy, tmp_run, model=TinyCNN(num_classes=3), bundle=bundle)
    (record,) = result.history
    assert "val_clean_acc" in record


def test_fit_with_a_bundle_checks_labels_against_its_classes(tmp_run):
    bundle = harden.testing.synthetic_bundle(n_train=64, n_test=16)
    bundle.train.tensors[1][3] = 5  # the bundle says 3 classes
    with pytest.raises(harden.DataError, match=r"expected labels in \[0, 2\]"):
        fit(tiny_policy(objectives=[{"name": "ce"}]), tmp_run, model=TinyCNN(num_classes=6), bundle=bundle)


def test_fit_refuses_train_data_and_a_bundle_together(tmp_run):
    bundle = harden.testing.synthetic_bundle()
    with pytest.raises(harden.DataError, match="either train= data or bundle="):
        fit(tiny_policy(), tmp_run, model=TinyCNN(num_classes=3), train=bundle.train, bundle=bundle)
    assert not tmp_run.exists()


def test_fit_builds_each_view_attack_once(tmp_path, monkeypatch):
    import harden.attacks.suite as suite

    original, built = suite.build_attack, []
    monkeypatch.setattr(suite, "build_attack", lambda spec, threat: built.append(spec.name) or original(spec, threat))
    objectives = [{"name": "pgd_at", "params": {"steps": 1}}, {"name": "trades", "weight": 0.5, "params": {"steps": 1}}]
    counts = []
    for batch_size in (64, 16):  # 6 and 24 steps an epoch
        built.clear()
        policy = tiny_policy(data={"batch_size": batch_size}, train={"probe_examples": 0}, objectives=objectives)
        fit(policy, tmp_path / str(batch_size))
        counts.append(len(built))
    assert counts == [2, 2]  # one per distinct view, however many batches
