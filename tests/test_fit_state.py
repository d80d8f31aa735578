"""harden.fit_state: epoch checkpoints (pruning, atomic writes on a full disk) and exact resume.

resume_hash and save_epoch_checkpoint/resume_run are tested directly; the rest through harden.fit
and ``harden fit --resume`` (damaged checkpoints, SIGKILL then resume).
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers_faults import enospc_after, flip_last_byte, leftovers, truncate, write_policy
from helpers_fit import assert_same_weights, fit

import harden
from harden.checkpoint import list_checkpoints, sha256_file
from harden.cli import main
from harden.distributed import Distributed
from harden.fit_setup import set_up
from harden.fit_state import resume_hash, resume_run, save_epoch_checkpoint
from harden.policy_io import policy_hash
from harden.testing import TinyCNN, synthetic_bundle, tiny_policy


def test_resume_hash_follows_the_policy_but_not_its_epochs():
    one = tiny_policy(train={"epochs": 1})
    assert resume_hash(one) == resume_hash(tiny_policy(train={"epochs": 7}))
    assert resume_hash(one) == policy_hash(one)  # epochs=1 is what resume_hash hashes
    assert policy_hash(tiny_policy(train={"epochs": 7})) != policy_hash(one)  # ... while the policy hash moves
    assert resume_hash(tiny_policy(train={"epochs": 1, "lr": 0.01})) != resume_hash(one)
    assert resume_hash(tiny_policy(train={"epochs": 1}, threat={"eps": 0.2})) != resume_hash(one)
    assert resume_hash(tiny_policy(train={"epochs": 1}, objectives=[{"name": "ce"}])) != resume_hash(one)


def test_save_epoch_checkpoint_then_resume_run_restores_the_run(tmp_path):
    b, dist = synthetic_bundle(96, 32), Distributed(torch.device("cpu"))
    policy = tiny_policy(objectives=[{"name": "ce"}], train={"epochs": 3, "probe_examples": 0, "keep_checkpoints": 1})
    run = set_up(None, policy, dist, b.train, b.test, b, tmp_path / "run")
    with torch.no_grad():
        for p in run.net.parameters():
            p.add_(0.5)
    run.history = [{"epoch": 1}, {"epoch": 2}]
    save_epoch_checkpoint(run, 1, "h1")
    saved_rng = torch.get_rng_state()
    save_epoch_checkpoint(run, 2, "h2")
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["epoch-0002.json", "epoch-0002.safetensors"]
    info = json.loads((run.ckpt_dir / "epoch-0002.json").read_text())["info"]
    assert info["policy_sha256"] == "h2" and info["resume_hash"] == resume_hash(policy)
    assert info["run_id"] == run.run_id == ""  # set_up alone: no run folder

    torch.rand(5)  # the global RNG moves on; resume brings it back
    fresh = set_up(None, policy, dist, b.train, b.test, b, tmp_path / "run")
    assert (fresh.start_epoch, fresh.resumed_from) == (0, None)
    assert not torch.equal(fresh.net.model.head.weight, run.net.model.head.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same policy: no warning
        resume_run(fresh)
    assert (fresh.start_epoch, fresh.resumed_from) == (2, 2)
    assert fresh.history == [{"epoch": 1}, {"epoch": 2}]
    assert_same_weights(fresh.net, run.net)
    assert torch.equal(torch.get_rng_state(), saved_rng)


def test_resume_run_without_a_checkpoint_starts_from_scratch(tmp_path):
    b = synthetic_bundle(96, 32)
    run = set_up(
        None, tiny_policy(objectives=[{"name": "ce"}]), Distributed(torch.device("cpu")), b.train, None, b, tmp_path
    )
    resume_run(run)
    assert (run.start_epoch, run.resumed_from, run.history) == (0, None, [])


def test_checkpoints_are_pruned(tmp_run):
    fit(
        tiny_policy(train={"epochs": 3, "keep_checkpoints": 1, "probe_examples": 0}, objectives=[{"name": "ce"}]),
        tmp_run,
    )
    assert sorted(p.name for p in (tmp_run / "checkpoints").iterdir()) == ["epoch-0003.json", "epoch-0003.safetensors"]


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


def test_resume_can_train_longer(tmp_run):
    train = {"epochs": 2, "schedule": "constant", "probe_examples": 0}
    fit(tiny_policy(train=train, objectives=[{"name": "ce"}]), tmp_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fit(tiny_policy(train={**train, "epochs": 3}, objectives=[{"name": "ce"}]), tmp_run, resume=True)
    assert again.resumed_from == 2
    assert [r["epoch"] for r in again.history] == [1, 2, 3]


def test_resume_under_an_edited_policy_is_refused(tmp_run):
    train = {"epochs": 2, "schedule": "constant", "probe_examples": 0}
    fit(tiny_policy(train=train, objectives=[{"name": "ce"}]), tmp_run)
    before = sorted(p.name for p in (tmp_run / "checkpoints").iterdir())
    edited = tiny_policy(train={**train, "epochs": 3, "lr": 0.01}, objectives=[{"name": "ce"}])
    with pytest.raises(harden.CheckpointError) as info:
        fit(edited, tmp_run, resume=True)
    msg = str(info.value)
    assert msg.startswith("expected the checkpoint of epoch 2 in ") and "to be written under this policy" in msg
    assert msg.endswith(
        "resume with the policy that wrote it (the folder's policy.yaml), or start over with --overwrite"
    )
    assert "\n" not in msg
    assert sorted(p.name for p in (tmp_run / "checkpoints").iterdir()) == before  # nothing changed
    assert not (tmp_run / "model.safetensors").exists()  # deleted by the resume: it was the old run's


def test_resume_refuses_the_checkpoints_of_another_run(tmp_path):
    policy = tiny_policy(train={"epochs": 1, "probe_examples": 0}, objectives=[{"name": "ce"}])
    fit(policy, tmp_path / "a")
    fit(policy, tmp_path / "b")
    # another run's checkpoints (valid, same policy) copied into b: today's "adopt them" bug
    for p in (tmp_path / "b" / "checkpoints").iterdir():
        p.unlink()
    for p in (tmp_path / "a" / "checkpoints").iterdir():
        (tmp_path / "b" / "checkpoints" / p.name).write_bytes(p.read_bytes())
    run_a = json.loads((tmp_path / "a" / "run.json").read_text())["run_id"]
    run_b = json.loads((tmp_path / "b" / "run.json").read_text())["run_id"]
    assert run_a != run_b
    with pytest.raises(harden.CheckpointError, match=rf"belong to this folder's run {run_b}, got run '{run_a}'"):
        fit(policy, tmp_path / "b", resume=True)


def test_a_forged_sidecar_never_reaches_model_json(tmp_run):
    policy = tiny_policy(train={"epochs": 2, "probe_examples": 16}, objectives=[{"name": "ce"}])
    first = fit(policy, tmp_run)
    sidecar = tmp_run / "checkpoints" / "epoch-0002.json"
    meta = json.loads(sidecar.read_text())
    assert meta["info"]["history"][-1]["val_clean_acc"] != 1.0
    meta["info"]["history"][-1]["val_clean_acc"] = 1.0  # a forged accuracy
    sidecar.write_text(json.dumps(meta, indent=1))
    with pytest.warns(RuntimeWarning, match="skipping checkpoint epoch-0002.json: .*truncated or modified"):
        again = fit(policy, tmp_run, resume=True)
    assert again.resumed_from == 1  # epoch 2 trained again, from the intact epoch 1
    stored = json.loads((tmp_run / "model.json").read_text())["history"]
    assert stored[-1]["val_clean_acc"] == first.history[-1]["val_clean_acc"] != 1.0


def test_resume_with_another_model_is_a_checkpoint_error(tmp_run):
    train = {"epochs": 1, "probe_examples": 0}
    policy = tiny_policy(train=train, objectives=[{"name": "ce"}])
    fit(policy, tmp_run, model=TinyCNN(num_classes=3))
    with pytest.raises(  # the same policy, a user's model of another width
        harden.CheckpointError, match=r"epoch 1 .* size mismatch .* resume only with the policy that wrote it"
    ):
        wider = TinyCNN(num_classes=3, width=24)
        fit(tiny_policy(train={**train, "epochs": 2}, objectives=[{"name": "ce"}]), tmp_run, model=wider, resume=True)


ROOT = Path(__file__).resolve().parents[1]


def harden_cmd(*args):
    return [sys.executable, "-m", "harden", *map(str, args)]


def env_one_thread():
    # every run of a comparison uses the same thread count: float reductions must add up alike
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def history_without_times(path):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())["history"]]


KILL_POLICIES = {
    # random PGD starts draw from the global RNG every batch: the RNG state must come back exactly
    "pgd_at": {"objectives": [{"name": "pgd_at", "params": {"steps": 3}}]},
    # plus two MI estimator networks and their Adam state
    "pgd_at+mi": {
        "objectives": [
            {"name": "pgd_at", "params": {"steps": 3}},
            {"name": "mi", "weight": 0.5, "params": {"steps": 3, "ce_weight": 0.0, "dim": 16}},
        ]
    },
}


def kill_policy(name):
    return tiny_policy(
        **KILL_POLICIES[name],
        data={"batch_size": 32},
        train={"epochs": 4, "checkpoint_every": 1, "keep_checkpoints": 2, "probe_examples": 32},
        verify={"attacks": [{"name": "fgsm"}], "n_examples": 32, "checks": False},
        export={"parity_examples": 8, "verify_examples": 0},
    )


def run_killed(policy_path, out, after="epoch-0002.json", timeout=300.0):
    """Start ``harden fit``, SIGKILL it as soon as ``checkpoints/AFTER`` exists; return its epoch."""
    proc = subprocess.Popen(
        harden_cmd("fit", policy_path, "--out", out, "-q"),
        env=env_one_thread(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = out / "checkpoints" / after
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"harden fit ended (rc {proc.returncode}) before {after}: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {after} after {timeout} s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: make its epochs slower"
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILL_POLICIES))
@pytest.mark.serial
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, name):
    policy_path = write_policy(tmp_path / "tiny.yaml", kill_policy(name))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(
        harden_cmd("fit", policy_path, "--out", straight, "-q"), env=env_one_thread(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    run_killed(policy_path, killed)
    epochs_left = [p.name for p in list_checkpoints(killed / "checkpoints")]
    assert "epoch-0002.json" in epochs_left
    again = subprocess.run(
        harden_cmd("fit", policy_path, "--out", killed, "--resume", "-q"),
        env=env_one_thread(),
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert history_without_times(killed / "model.json") == history_without_times(straight / "model.json")
    assert leftovers(killed) == []


@pytest.mark.slow
@pytest.mark.serial
def test_sigkill_then_run_resume_equals_an_uninterrupted_fit(tmp_path):
    policy_path = write_policy(tmp_path / "tiny.yaml", kill_policy("pgd_at"))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["fit", str(policy_path), "--out", str(straight), "-q"]) == 0
    run_killed(policy_path, killed)
    # harden run shares fit's resume; it continues the killed run, then verifies, certifies, exports
    assert main(["run", str(policy_path), "--out", str(killed), "--resume", "-q"]) == 0
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert (killed / "certificate.json").is_file() and (killed / "model.onnx").is_file()
    assert leftovers(killed) == []


DAMAGE = {
    "truncated": (truncate, "truncated or modified"),
    "one-byte-flipped": (flip_last_byte, "truncated or modified"),
    "tensor-file-gone": (lambda p: p.unlink(), "readable checkpoint"),
    "sidecar-garbage": (lambda p: p.with_suffix(".json").write_text("{half a sidecar"), "readable checkpoint"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, capsys, damage):
    policy = tiny_policy(train={"epochs": 2, "probe_examples": 16}, objectives=[{"name": "ce"}])
    policy_path = write_policy(tmp_path / "p.yaml", policy)
    out = tmp_path / "run"
    assert main(["fit", str(policy_path), "--out", str(out), "-q"]) == 0
    straight = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").unlink()
    fn, reason = DAMAGE[damage]
    fn(out / "checkpoints" / "epoch-0002.safetensors")
    capsys.readouterr()

    assert main(["fit", str(policy_path), "--out", str(out), "--resume", "-q"]) == 0
    err = capsys.readouterr().err
    assert "harden: warning: skipping checkpoint epoch-0002.json" in err
    assert reason in err and "trying epoch-0001.json" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no source location
    assert (out / "model.safetensors").read_bytes() == straight  # epoch 2 trained again, the same
    assert leftovers(out) == []


def test_resume_with_every_checkpoint_damaged_starts_over(tmp_path, capsys):
    policy = tiny_policy(train={"epochs": 2, "probe_examples": 16}, objectives=[{"name": "ce"}])
    policy_path = write_policy(tmp_path / "p.yaml", policy)
    out = tmp_path / "run"
    assert main(["fit", str(policy_path), "--out", str(out), "-q"]) == 0
    straight = (out / "model.safetensors").read_bytes()
    for blob in (out / "checkpoints").glob("*.safetensors"):
        truncate(blob)
    capsys.readouterr()
    assert main(["fit", str(policy_path), "--out", str(out), "--resume", "-q"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint epoch-0002.json" in err and "skipping checkpoint epoch-0001.json" in err
    assert "no older checkpoint left" in err
    assert (out / "model.safetensors").read_bytes() == straight  # seeded: from scratch is the same run


def test_full_disk_during_fit_is_one_error_line_and_resumable(tmp_path, monkeypatch, capsys):
    policy = tiny_policy(train={"epochs": 2, "probe_examples": 16}, objectives=[{"name": "ce"}])
    policy_path = write_policy(tmp_path / "p.yaml", policy)
    out = tmp_path / "run"
    # writes: the lock file, run.json, policy.yaml, epoch-0001.safetensors, then the disk fills
    # during epoch-0001.json
    monkeypatch.setattr(os, "write", enospc_after(4))
    assert main(["fit", str(policy_path), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harden: error: expected to write ") and "epoch-0001.json" in err
    assert "got a full disk (No space left on device)" in err and "--resume" in err
    assert len(err.splitlines()) == 1
    # no temp file, the tensor file went with its sidecar, and with nothing to resume from, the run
    # folder this fit created (run.json, policy.yaml) is gone again
    assert not out.exists()
    monkeypatch.undo()  # space freed
    assert main(["fit", str(policy_path), "--out", str(out), "--resume", "-q"]) == 0
    assert (out / "model.safetensors").is_file()


def _forge_sidecar(ckpt_dir, edit):
    """Edit the epoch-1 sidecar's state tree, then re-hash it as an attacker can (the digest has no secret)."""
    from harden.checkpoint import _digest

    side = ckpt_dir / "epoch-0001.json"
    meta = json.loads(side.read_text())
    edit(meta["state"]["__dict__"])
    blob = (ckpt_dir / meta["file"]).read_bytes()
    meta.pop("sha256")
    meta["sha256"] = _digest(blob, meta)
    side.write_text(json.dumps(meta, indent=1))


def _sched(tree):
    return tree["scheduler"]["__dict__"]


def _group0(tree):
    return tree["optimizer"]["__dict__"]["param_groups"][0]["__dict__"]


FORGERIES = {
    # LambdaLR.load_state_dict does self.__dict__.update(state): any attribute, e.g. its optimizer
    "scheduler attribute": lambda t: _sched(t).__setitem__("optimizer", 1),
    "scheduler base_lrs": lambda t: _sched(t).__setitem__("base_lrs", [1000.0]),
    "scheduler base_lrs length": lambda t: _sched(t).__setitem__("base_lrs", [0.1, 0.1]),
    "scheduler last_epoch type": lambda t: _sched(t).__setitem__("last_epoch", "7"),
    "scheduler lr_lambdas": lambda t: _sched(t).__setitem__("lr_lambdas", [{"__dict__": {"x": 1}}]),
    "scheduler key missing": lambda t: _sched(t).pop("_last_lr"),
    "optimizer group count": lambda t: t["optimizer"]["__dict__"]["param_groups"].append(
        t["optimizer"]["__dict__"]["param_groups"][0]
    ),
    "optimizer group key": lambda t: _group0(t).__setitem__("bogus", 1),
    "optimizer lr type": lambda t: _group0(t).__setitem__("lr", "fast"),
    "optimizer hyperparameter": lambda t: _group0(t).__setitem__("weight_decay", 5.0),
    "optimizer state shape": lambda t: t["optimizer"]["__dict__"]["state"]["__items__"][0][1]["__dict__"].__setitem__(
        "momentum_buffer", t["rng"]["__dict__"]["torch"]
    ),
    "optimizer state index": lambda t: t["optimizer"]["__dict__"]["state"]["__items__"][0].__setitem__(0, 999),
    "rng missing": lambda t: t.pop("rng"),
    "rng wrong tensor": lambda t: t["rng"]["__dict__"].__setitem__("torch", 5),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_forged_optimizer_scheduler_or_rng_state_is_a_one_line_checkpoint_error(tmp_path, name):
    b, dist = synthetic_bundle(96, 32), Distributed(torch.device("cpu"))
    policy = tiny_policy(objectives=[{"name": "ce"}], train={"epochs": 2, "probe_examples": 0, "momentum": 0.9})
    run = set_up(None, policy, dist, b.train, b.test, b, tmp_path / "run")
    loss = run.net(torch.rand(2, 1, 8, 8)).sum()
    loss.backward()
    run.optimizer.step()  # momentum buffers: per-parameter optimizer state
    run.scheduler.step()
    save_epoch_checkpoint(run, 1, "h")
    _forge_sidecar(run.ckpt_dir, FORGERIES[name])
    fresh = set_up(None, policy, dist, b.train, b.test, b, tmp_path / "run")
    sched_before = dict(vars(fresh.scheduler))
    with pytest.raises(harden.CheckpointError) as info:
        resume_run(fresh)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{str(run.ckpt_dir / 'epoch-0001.json')!r}" in msg
    assert "resume cannot continue from it" in msg and "--overwrite" in msg
    assert "delete epoch-0001.json and epoch-0001.safetensors to resume from an older checkpoint" in msg
    assert fresh.scheduler.optimizer is fresh.optimizer
    assert fresh.scheduler.base_lrs == sched_before["base_lrs"] == [policy.train.lr]
    assert (fresh.start_epoch, fresh.resumed_from) == (0, None)


def test_an_honest_checkpoint_with_optimizer_state_still_resumes(tmp_path):
    b, dist = synthetic_bundle(96, 32), Distributed(torch.device("cpu"))
    for optimizer in ("sgd", "adamw"):
        policy = tiny_policy(
            objectives=[{"name": "ce"}], train={"epochs": 2, "probe_examples": 0, "optimizer": optimizer}
        )
        run = set_up(None, policy, dist, b.train, b.test, b, tmp_path / optimizer)
        run.net(torch.rand(2, 1, 8, 8)).sum().backward()
        run.optimizer.step()
        run.scheduler.step()
        save_epoch_checkpoint(run, 1, "h")
        fresh = set_up(None, policy, dist, b.train, b.test, b, tmp_path / optimizer)
        resume_run(fresh)
        assert fresh.resumed_from == 1
        assert fresh.scheduler.state_dict() == run.scheduler.state_dict()
        for p_run, p_fresh in zip(run.net.parameters(), fresh.net.parameters(), strict=True):
            for key, value in run.optimizer.state[p_run].items():
                assert torch.equal(fresh.optimizer.state[p_fresh][key], value)


def test_a_forged_history_is_a_checkpoint_error(tmp_path):
    from harden.checkpoint import _digest

    b, dist = synthetic_bundle(96, 32), Distributed(torch.device("cpu"))
    policy = tiny_policy(objectives=[{"name": "ce"}], train={"epochs": 2, "probe_examples": 0})
    run = set_up(None, policy, dist, b.train, b.test, b, tmp_path / "run")
    save_epoch_checkpoint(run, 1, "h")
    side = run.ckpt_dir / "epoch-0001.json"
    meta = json.loads(side.read_text())
    meta["info"]["history"] = 5
    meta.pop("sha256")
    meta["sha256"] = _digest((run.ckpt_dir / meta["file"]).read_bytes(), meta)
    side.write_text(json.dumps(meta))
    with pytest.raises(harden.CheckpointError, match=r"history of epoch records, got int"):
        resume_run(set_up(None, policy, dist, b.train, b.test, b, tmp_path / "run"))


# --- the best epoch, early stopping and metrics across a resume ---------------------------------------------


def best_policy(epochs, **train):
    train = {"epochs": epochs, "probe_examples": 16, "schedule": "constant", "tensorboard": False, **train}
    return tiny_policy(train=train, objectives=[{"name": "ce"}])


def test_resume_keeps_the_best_so_far(tmp_run, probe_sequence):
    probe_sequence([0.2, 0.5, 0.4, 0.45, 0.3])
    fit(best_policy(3), tmp_run)
    best = tmp_run / "checkpoints" / "best.safetensors"
    before = best.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact best: no warning
        resumed = fit(best_policy(5), tmp_run, resume=True)
    # epoch 4 (0.45) would be a "best" to a run that forgot epoch 2 (0.5)
    assert resumed.resumed_from == 3 and resumed.best_epoch == 2
    assert best.read_bytes() == before
    assert json.loads(best.with_suffix(".json").read_text())["epoch"] == 2


def test_resume_writes_the_best_from_the_restored_model_when_the_crash_came_between(tmp_run, probe_sequence):
    from harden.checkpoint import load_checkpoint

    probe_sequence([0.2, 0.5, 0.6])
    fit(best_policy(2), tmp_run)
    for suffix in (".json", ".safetensors"):  # killed after epoch 2's checkpoint, before its best file
        (tmp_run / "checkpoints" / f"best{suffix}").unlink()
    (tmp_run / "model.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the restored model (epoch 2) is the best: written again, quietly
        resumed = fit(best_policy(3), tmp_run, resume=True)
    assert resumed.best_epoch == 3
    epoch, _, info = load_checkpoint(tmp_run / "checkpoints" / "best.json")
    assert (epoch, info["val_pgd_acc"]) == (3, 0.6)


def test_resume_restores_the_best_of_the_checkpoint_epoch(tmp_run, probe_sequence):
    from harden.checkpoint import load_checkpoint

    probe_sequence([0.2, 0.5])
    fit(best_policy(2), tmp_run)
    for suffix in (".json", ".safetensors"):  # killed after epoch 2's checkpoint, before its best file
        (tmp_run / "checkpoints" / f"best{suffix}").unlink()
    (tmp_run / "model.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the restored model is the best epoch's: written again, quietly
        resumed = fit(best_policy(2), tmp_run, resume=True)
    assert resumed.best_epoch == 2
    epoch, state, _ = load_checkpoint(tmp_run / "checkpoints" / "best.json")
    assert epoch == 2
    assert all(torch.equal(v, state["model"][k]) for k, v in resumed.model.state_dict().items())


def test_a_lost_best_warns_and_select_best_falls_back_to_the_last_epoch(tmp_run, probe_sequence):
    probe_sequence([0.5, 0.2, 0.1])
    fit(best_policy(2, select="best"), tmp_run)
    (tmp_run / "checkpoints" / "best.safetensors").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning) as caught:
        resumed = fit(best_policy(3, select="best"), tmp_run, resume=True)
    messages = [str(w.message) for w in caught]
    assert any("the best checkpoint of epoch 1" in m and "missing or damaged" in m for m in messages), messages
    assert any("expected the weights of the best epoch 1 for train.select: best" in m for m in messages), messages
    assert resumed.best_epoch == 1
    assert not (tmp_run / "checkpoints" / "best.json").exists()


def test_a_stopped_run_does_not_train_again_on_resume(tmp_run, probe_sequence, monkeypatch):
    probe_sequence([0.5, 0.4, 0.3, 0.2, 0.1, 0.1])
    first = fit(best_policy(6, early_stopping=2), tmp_run)
    assert first.stopped_early and [r["epoch"] for r in first.history] == [1, 2, 3]
    monkeypatch.setattr(harden.train, "train_epoch", lambda run, epoch: pytest.fail("trained again"))
    again = fit(best_policy(6, early_stopping=2), tmp_run, resume=True)
    assert again.resumed_from == 3 and again.stopped_early and len(again.history) == 3
    assert again.best_epoch == 1
    assert [p.name for p in list_checkpoints(tmp_run / "checkpoints")][-1] == "epoch-0003.json"


def test_metrics_csv_keeps_one_row_per_epoch_across_a_resume(tmp_run):
    import csv

    policy = best_policy(3, keep_checkpoints=3)
    fit(policy, tmp_run)
    for suffix in (".json", ".safetensors"):  # epoch 3's checkpoint lost: its row must go, then come back once
        (tmp_run / "checkpoints" / f"epoch-0003{suffix}").unlink()
    resumed = fit(policy, tmp_run, resume=True)
    assert resumed.resumed_from == 2
    with open(tmp_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["train_loss"]) for r in rows] == [r["train_loss"] for r in resumed.history]


def test_augmented_training_resumes_exactly(tmp_path):
    train = {"schedule": "constant", "probe_examples": 0, "tensorboard": False}
    policy = {"data": {"augment": True}, "objectives": [{"name": "ce"}]}
    fit(tiny_policy(train={**train, "epochs": 1}, **policy), tmp_path / "resumed")
    resumed = fit(tiny_policy(train={**train, "epochs": 2}, **policy), tmp_path / "resumed", resume=True)
    straight = fit(tiny_policy(train={**train, "epochs": 2}, **policy), tmp_path / "straight")
    plain = fit(tiny_policy(train={**train, "epochs": 2}, objectives=[{"name": "ce"}]), tmp_path / "plain")
    assert resumed.resumed_from == 1
    assert_same_weights(resumed.model, straight.model)
    assert resumed.history[-1]["train_loss"] != plain.history[-1]["train_loss"]  # the augmentation did apply
