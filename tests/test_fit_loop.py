"""harden.fit_loop: the epoch loop (history records, the per-epoch probe, batch checks, bad-step skipping).

train_epoch is tested directly on a set-up run; the rest through harden.fit.
"""

import pytest
import torch
from helpers_faults import write_policy
from helpers_fit import fit
from torch.utils.data import TensorDataset

import harden
from harden.cli import main
from harden.distributed import Distributed
from harden.fit_loop import MAX_BAD_STEPS, train_epoch
from harden.fit_setup import set_up
from harden.objectives import OBJECTIVES, Objective
from harden.testing import TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy

HISTORY_KEYS = {"epoch", "lr", "train_loss", "val_clean_acc", "val_pgd_acc", "seconds", "skipped_steps"}


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


def test_nan_in_a_later_batch_stops_training_with_nothing_half_written(tmp_path, capsys, user_module):
    policy = tiny_policy(data={"name": "faulty:nan_pixel", "batch_size": 16}, objectives=[{"name": "ce"}])
    out = tmp_path / "run"
    path = write_policy(tmp_path / "p.yaml", policy)
    assert main(["fit", str(path), "--out", str(out), "--allow-code", "faulty", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harden: error: expected finite pixels, got NaN or infinity"), err
    # nothing resumable was written: the run folder this fit created is gone again (no run.json, no temp)
    assert not out.exists()


def test_train_epoch_skips_bad_steps_and_aborts_at_max_bad_steps(tmp_path, nan_objective):
    assert harden.train.MAX_BAD_STEPS == MAX_BAD_STEPS == 10  # still importable from harden.train
    b = synthetic_bundle(96, 32)
    policy = tiny_policy(
        data={"batch_size": 16}, train={"epochs": 2, "probe_examples": 0}, objectives=[{"name": nan_objective}]
    )
    run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, None, b, tmp_path)
    assert run.steps_per_epoch == 6 < MAX_BAD_STEPS
    before = [p.detach().clone() for p in run.net.parameters()]
    record = train_epoch(run, 0)
    assert record["epoch"] == 1
    assert record["skipped_steps"] == 6 and run.bad_run == 6  # every step skipped, none aborts yet
    assert record["train_loss"] == 0.0  # nothing counted
    assert record["lr"] == pytest.approx(policy.train.lr)  # no scheduler step
    for old, new in zip(before, run.net.parameters(), strict=True):
        assert torch.equal(old, new)  # no optimizer step
    # the count runs on across the epoch boundary: the 4th bad step of epoch 2 is the 10th in a row
    with pytest.raises(harden.HardenError, match=rf"got {MAX_BAD_STEPS} non-finite in a row \(epoch 2, batch 3, "):
        train_epoch(run, 1)
    assert run.bad_run == MAX_BAD_STEPS


def test_train_epoch_record_of_a_finite_run(tmp_path):
    b = synthetic_bundle(96, 32)
    objectives = [{"name": "ce"}, {"name": "ce", "weight": 0.5}]
    policy = tiny_policy(data={"batch_size": 32}, train={"probe_examples": 0}, objectives=objectives)
    run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, None, b, tmp_path)
    record = train_epoch(run, 0)
    assert sorted(record) == ["epoch", "loss_0_ce", "loss_1_ce", "lr", "skipped_steps", "train_loss"]
    assert record["skipped_steps"] == 0 and run.bad_run == 0
    assert record["loss_1_ce"] == pytest.approx(0.5 * record["loss_0_ce"], rel=1e-5)
    assert record["train_loss"] == pytest.approx(record["loss_0_ce"] + record["loss_1_ce"], rel=1e-5)
    assert run.history == []  # end_epoch appends the record, not train_epoch
