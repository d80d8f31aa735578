"""harden.fit_setup: the model (built, or the user's wrapped and checked), objectives, optimizer and schedule.

set_up is tested directly; the rest through harden.fit.
"""

import pytest
import torch
from helpers_fit import fit
from torch.utils.data import TensorDataset

import harden
from harden.distributed import Distributed
from harden.fit_setup import epoch_loader, set_up
from harden.objectives import ObjectiveSet
from harden.testing import SoftmaxHead, TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy


def test_set_up_builds_the_objective_set_from_the_policy_weights(tmp_path):
    objectives = [
        {"name": "ce"},
        {"name": "trades", "weight": 0.0},
        {"name": "pgd_at", "weight": 0.5, "params": {"steps": 1}, "every": 2},
    ]
    policy = tiny_policy(objectives=objectives, train={"probe_examples": 0})
    b = synthetic_bundle(96, 32)
    run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, b.test, b, tmp_path / "run")
    assert [(w, o.name) for w, o in run.objectives] == [(1.0, "ce"), (0.5, "pgd_at")]  # weight 0: left out
    assert isinstance(run.mix, ObjectiveSet)
    assert run.mix.weighted is run.objectives and run.mix.every == [1, 2]
    assert run.loss_names == ["loss_0_ce", "loss_1_pgd_at"]
    assert (run.num_classes, run.in_chans, run.steps_per_epoch) == (3, 1, 2)  # 96 images, batches of 64
    assert isinstance(run.optimizer, torch.optim.SGD) and run.optimizer.param_groups[0]["lr"] == 0.05
    assert not run.scaler.is_enabled()  # fp32
    assert (run.start_epoch, run.resumed_from, run.history, run.bad_run) == (0, None, [], 0)
    assert not run.run_dir.exists()  # nothing written
    x, y = next(iter(epoch_loader(b.train, policy, 0)))
    total, parts = run.mix.loss(run.mix.context(x, y, policy.threat))
    assert len(parts) == 2
    torch.testing.assert_close(total, parts[0] + parts[1])


def test_set_up_wraps_a_user_model_and_counts_its_logits(tmp_path):
    user = TinyCNN(num_classes=4)
    train = TensorDataset(*synthetic_tensors(40, num_classes=3, seed=1))
    policy = tiny_policy(objectives=[{"name": "ce"}], data={"batch_size": 16})
    run = set_up(user, policy, Distributed(torch.device("cpu")), train, None, None, tmp_path)
    assert isinstance(run.net, harden.Normalized) and run.net.model is user
    assert (run.num_classes, run.in_chans, run.steps_per_epoch, run.val) == (4, None, 3, None)
    assert run.loss_names == []  # a single objective: no per-objective losses


def test_model_none_with_user_data_raises(tmp_run):
    with pytest.raises(harden.DataError, match="expected a model"):
        fit(tiny_policy(), tmp_run, train=TensorDataset(*synthetic_tensors(8)))


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


def test_fit_refuses_a_model_with_other_channels(tmp_run, user_module):
    policy = tiny_policy(model={"name": "faulty:rgb_net"}, objectives=[{"name": "ce"}])
    with pytest.raises(harden.ModelError, match="expected a model that accepts the data's images"):
        harden.fit(None, policy, run_dir=tmp_run, progress=False)
    assert not tmp_run.exists()


def test_fit_warns_about_a_softmax_head(tmp_run):
    policy = tiny_policy(objectives=[{"name": "ce"}], train={"probe_examples": 0})
    with pytest.warns(RuntimeWarning, match="got probabilities"):
        harden.fit(SoftmaxHead(TinyCNN(num_classes=3)), policy, run_dir=tmp_run, progress=False)


def test_fit_on_user_data_checks_labels_against_the_model(tmp_run):
    x, y = synthetic_tensors(32)
    y[5] = 7
    # user data: the classes are the model's logits, so a label beyond them names the head
    with pytest.raises(harden.ModelError, match=r"got 3 logits and labels beyond them \(expected labels in \[0, 2\]"):
        harden.fit(
            TinyCNN(num_classes=3), tiny_policy(objectives=[{"name": "ce"}]), TensorDataset(x, y), run_dir=tmp_run
        )


def test_fit_on_an_empty_user_dataset(tmp_run):
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(harden.DataError):
        harden.fit(TinyCNN(num_classes=3), tiny_policy(objectives=[{"name": "ce"}]), empty, run_dir=tmp_run)
    assert not tmp_run.exists()


def test_history_best_takes_the_first_of_the_highest_probe_and_skips_non_numbers():
    from harden.fit_setup import history_best, improves

    history = [
        {"epoch": 1, "val_pgd_acc": 0.2},
        {"epoch": 2, "val_pgd_acc": 0.5},
        {"epoch": 3, "val_pgd_acc": 0.5},  # a tie is no improvement
        {"epoch": 4},  # no probe
        {"epoch": 5, "val_pgd_acc": float("nan")},
        {"epoch": 6, "val_pgd_acc": True},  # a forged record: not a number
        {"epoch": "7", "val_pgd_acc": 0.9},  # nor an epoch
    ]
    assert history_best(history) == (2, 0.5)
    assert history_best([]) == (None, None)
    assert [improves(v, 0.5) for v in (0.6, 0.5, 0.4, float("inf"), None, "0.9")] == [
        True, False, False, False, False, False
    ]


def test_track_best_keeps_the_weights_only_for_select_best(tmp_path):
    b = synthetic_bundle(96, 32)
    dist = Distributed(torch.device("cpu"))
    for select, kept in (("last", False), ("best", True)):
        policy = tiny_policy(train={"select": select}, objectives=[{"name": "ce"}])
        run = set_up(None, policy, dist, b.train, b.test, b, tmp_path)
        assert run.track_best({"epoch": 1, "val_pgd_acc": 0.3}) is True
        assert (run.best_epoch, run.best_value, run.best_state is not None) == (1, 0.3, kept)
        if kept:
            for k, v in run.net.state_dict().items():
                assert torch.equal(run.best_state[k], v) and run.best_state[k].data_ptr() != v.data_ptr()
        assert run.track_best({"epoch": 2, "val_pgd_acc": 0.3}) is False
        assert run.track_best({"epoch": 3}) is False
        assert run.best_epoch == 1
