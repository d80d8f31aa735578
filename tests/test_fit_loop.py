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


# --- what each epoch reports, the best epoch, early stopping -------------------------------------------------

EPOCH_LINE = r"^epoch (\d+)/(\d+)  loss \d+\.\d{3}  val clean \d+\.\d%  PGD-3 \d+\.\d%(  \(best\))?  \d+\.\d s$"


def test_each_epoch_prints_one_line_with_progress_and_none_without(tmp_path, capsys):
    import re

    policy = tiny_policy(train={"epochs": 2, "probe_examples": 16}, objectives=[{"name": "ce"}])
    harden.fit(None, policy, run_dir=tmp_path / "a", progress=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert [re.match(EPOCH_LINE, ln).group(1, 2) for ln in lines] == [("1", "2"), ("2", "2")], lines
    assert "(best)" in lines[0]  # the first probe is the best so far
    fit(policy, tmp_path / "b")
    assert capsys.readouterr().out == ""


def test_epoch_line_formats_the_record():
    from harden.fit_loop import epoch_line

    record = {"epoch": 3, "train_loss": 0.4123, "val_clean_acc": 0.9712, "val_pgd_acc": 0.5121, "seconds": 12.44}
    assert epoch_line(record, 5, 10, best=True) == "epoch 3/5  loss 0.412  val clean 97.1%  PGD-10 51.2%  (best)  12.4 s"
    bare = {"epoch": 1, "train_loss": 2.0, "skipped_steps": 2, "seconds": 0.04}
    assert epoch_line(bare, 1, 10) == "epoch 1/1  loss 2.000  2 non-finite steps skipped  0.0 s"


def best_policy(**train):
    return tiny_policy(
        train={"epochs": 6, "probe_examples": 16, "schedule": "constant", **train}, objectives=[{"name": "ce"}]
    )


def test_early_stopping_after_patience_epochs_without_improvement(tmp_run, probe_sequence, caplog):
    import logging

    probe_sequence([0.2, 0.5, 0.4, 0.5, 0.9, 0.9])  # a tie (epoch 4) is no improvement
    with caplog.at_level(logging.INFO, logger="harden"):
        result = fit(best_policy(early_stopping=2), tmp_run)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2 and result.stopped_early is True
    assert any("early stopping: no better probe robust accuracy in the 2 epochs since epoch 2" in r.getMessage()
               for r in caplog.records)
    # the stopping epoch is checkpointed (checkpoint_every aside) and says so
    from harden.checkpoint import load_checkpoint

    epoch, _, info = load_checkpoint(tmp_run / "checkpoints" / "epoch-0004.json")
    assert (epoch, info["stopped_early"], info["best_epoch"]) == (4, True, 2)
    model_json = harden.train.read_model_info(result.weights)
    assert (model_json["epoch"], model_json["best_epoch"], model_json["stopped_early"]) == (4, 2, True)


def test_no_early_stop_when_the_probe_keeps_improving_or_at_the_last_epoch(tmp_run, probe_sequence):
    probe_sequence([0.1, 0.2, 0.2, 0.2])
    result = fit(best_policy(epochs=4, early_stopping=2), tmp_run)
    assert len(result.history) == 4 and result.stopped_early is False and result.best_epoch == 2


def test_best_checkpoint_tracks_the_highest_probe_and_survives_pruning(tmp_run, probe_sequence):
    from harden.checkpoint import load_checkpoint

    probe_sequence([0.2, 0.5, 0.4, 0.3])
    result = fit(best_policy(epochs=4, keep_checkpoints=1), tmp_run)
    assert result.best_epoch == 2 and result.stopped_early is False
    names = sorted(p.name for p in (tmp_run / "checkpoints").iterdir())
    assert names == ["best.json", "best.safetensors", "epoch-0004.json", "epoch-0004.safetensors"]
    epoch, state, info = load_checkpoint(tmp_run / "checkpoints" / "best.json")
    assert (epoch, info["val_pgd_acc"]) == (2, 0.5)
    # select: last (the default): the model is the last epoch's, not the best's
    _, last, _ = load_checkpoint(tmp_run / "checkpoints" / "epoch-0004.json")
    final = result.model.state_dict()
    assert all(torch.equal(final[k], last["model"][k]) for k in final)
    assert not all(torch.equal(final[k], state["model"][k]) for k in final)


def test_select_best_returns_and_saves_the_best_epochs_weights(tmp_run, probe_sequence):
    from harden.checkpoint import load_checkpoint
    from harden.train import load_trained

    probe_sequence([0.2, 0.5, 0.4, 0.3])
    policy = best_policy(epochs=4, select="best")
    result = fit(policy, tmp_run)
    _, best, _ = load_checkpoint(tmp_run / "checkpoints" / "best.json")
    _, last, _ = load_checkpoint(tmp_run / "checkpoints" / "epoch-0004.json")
    final = result.model.state_dict()
    assert all(torch.equal(final[k], best["model"][k]) for k in final)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in final)  # the epochs did differ
    saved, _ = load_trained(policy, result.weights)
    assert all(torch.equal(saved.state_dict()[k], final[k]) for k in final)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]  # history keeps every epoch
    assert harden.train.read_model_info(result.weights)["epoch"] == 2


def test_keep_best_false_writes_no_best_file(tmp_run, probe_sequence):
    probe_sequence([0.2, 0.5])
    result = fit(best_policy(epochs=2, keep_best=False), tmp_run)
    assert result.best_epoch == 2
    assert not (tmp_run / "checkpoints" / "best.json").exists()


def test_without_a_probe_there_is_no_best_epoch(tmp_run):
    result = fit(tiny_policy(train={"probe_examples": 0}, objectives=[{"name": "ce"}]), tmp_run)
    assert result.best_epoch is None and result.stopped_early is False
    assert not (tmp_run / "checkpoints" / "best.json").exists()


def test_the_probe_attacks_a_balanced_sample_the_same_every_epoch(tmp_path, monkeypatch):
    import time

    from harden.fit_loop import end_epoch

    # class-sorted validation data: the first 12 examples are all of class 0
    x, y = synthetic_tensors(36, seed=2)
    order = torch.argsort(y, stable=True)
    val = TensorDataset(x[order], y[order])
    b = synthetic_bundle(96, 32)
    policy = tiny_policy(train={"epochs": 2, "probe_examples": 12}, objectives=[{"name": "ce"}])
    run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, val, b, tmp_path)
    seen = []
    real = harden.fit_loop.clean_and_pgd_counts

    def spy(*args, **kwargs):
        seen.append(kwargs["probe"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(harden.fit_loop, "clean_and_pgd_counts", spy)
    for epoch in range(2):
        end_epoch(run, train_epoch(run, epoch), time.perf_counter(), "hash")
    assert torch.equal(seen[0], seen[1])
    assert torch.bincount(y[order][seen[0]], minlength=3).tolist() == [4, 4, 4]


def test_select_best_without_validation_data_warns_and_keeps_the_last_epoch(tmp_run):
    x, y = synthetic_tensors(64)
    policy = tiny_policy(train={"select": "best", "probe_examples": 16}, objectives=[{"name": "ce"}])
    with pytest.warns(RuntimeWarning, match=r"for train.select: best, got none \(no validation data\)"):
        result = fit(policy, tmp_run, model=TinyCNN(num_classes=3), train=TensorDataset(x, y))
    assert result.best_epoch is None and len(result.history) == 1


def test_a_head_smaller_than_the_labels_of_user_data_is_blamed_on_the_model():
    from harden.errors import ModelError
    from harden.testing import TinyCNN, tiny_policy

    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10  # ten classes
    policy = tiny_policy(objectives=[{"name": "ce"}], train={"epochs": 1, "probe_examples": 0})
    with pytest.raises(ModelError, match=r"got 5 logits and labels beyond them .*set model.num_classes"):
        harden.fit(TinyCNN(num_classes=5), policy, train=TensorDataset(x, y), progress=False)
