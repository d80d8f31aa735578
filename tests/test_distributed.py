"""Distributed training under torchrun (2 gloo processes on CPU): identical replicas, one writer.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node=2`` on a tiny
policy (TinyCNN on the synthetic set), so it exercises the real process-group set-up, DDP, the
DistributedSampler and the rank-0-only writes, the way users run it.
"""

import collections
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import harden
from harden.checkpoint import sha256_file
from harden.distributed import Distributed, distributed_session
from harden.policy_io import dump_policy
from harden.testing import tiny_policy
from harden.train import load_trained

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

#: pgd_at + mi (own estimator networks and optimizer) + jsigr (double backprop through DDP)
MIX = [
    {"name": "pgd_at", "params": {"steps": 2}},
    {"name": "mi", "weight": 0.5, "params": {"steps": 2, "ce_weight": 0.0, "dim": 16}},
    {"name": "jsigr", "weight": 0.2, "params": {"fraction": 0.5}},
]

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from pathlib import Path

    import torch

    import harden
    import harden.checkpoint as ck
    import harden.train as tr
    from harden.checkpoint import weights_sha256
    from harden.objectives import mi

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    writes = []

    def recording(original):
        def write(path, data):
            writes.append(str(path))
            return original(path, data)
        return write

    ck.atomic_write = recording(ck.atomic_write)  # save_checkpoint
    tr.atomic_write = recording(tr.atomic_write)  # policy.yaml, model.safetensors, model.json
    seen = {}
    after_step = mi.MI.after_step

    def recording_after_step(self, ctx):
        after_step(self, ctx)
        seen["mi"] = self

    mi.MI.after_step = recording_after_step
    policy = harden.load_policy(sys.argv[1])
    result = harden.fit(None, policy, run_dir=sys.argv[2], progress=False)
    est = seen["mi"]
    tensors = [*est.natural.state_dict().values(), *est.adversarial.state_dict().values()]
    mi_hash = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()
    record = {
        "rank": rank,
        "info": result.info,
        "weights": weights_sha256(result.model),
        "mi": mi_hash,
        "history": [{k: v for k, v in r.items() if k != "seconds"} for r in result.history],
        "writes": writes,
        "training": result.model.training,
    }
    Path(sys.argv[3], f"rank{rank}.json").write_text(json.dumps(record))
    """
)


def torchrun(*args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.serial
def test_two_processes_train_one_model_and_rank0_writes_everything_once(tmp_path):
    policy = tiny_policy(
        data={"batch_size": 32},
        train={"epochs": 3, "probe_examples": 32, "probe_steps": 2, "keep_checkpoints": 5, "tensorboard": False},
        objectives=MIX,
    )
    policy_file, run, out = tmp_path / "policy.yaml", tmp_path / "run", tmp_path / "out"
    policy_file.write_text(dump_policy(policy))
    out.mkdir()
    (tmp_path / "script.py").write_text(SCRIPT)
    torchrun("script.py", policy_file, run, out, cwd=tmp_path)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["info"], r1["info"]) == ({"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2})

    # one model: parameters, buffers (BatchNorm statistics) and MI estimators equal on both ranks
    assert r0["weights"] == r1["weights"]
    assert r0["mi"] == r1["mi"]
    assert sha256_file(run / "model.safetensors") == r1["weights"]
    assert not r0["training"] and not r1["training"]

    # metrics are global (summed over ranks), so both ranks report the same history
    assert r0["history"] == r1["history"]
    losses = [r["train_loss"] for r in r0["history"]]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert all(r["skipped_steps"] == 0 for r in r0["history"])
    assert {"loss_0_pgd_at", "loss_1_mi", "loss_2_jsigr"} <= set(r0["history"][0])

    # rank 0 wrote each file exactly once; rank 1 wrote nothing; no temp files are left
    assert r1["writes"] == []
    names = collections.Counter(os.path.relpath(p, run) for p in r0["writes"])
    expected = {"policy.yaml", "model.safetensors", "model.json"} | {
        f"checkpoints/epoch-{e:04d}.{ext}" for e in (1, 2, 3) for ext in ("safetensors", "json")
    }
    best = {n for n in names if n.startswith("checkpoints/best.")}  # the best-probe epoch's weights
    assert best == {"checkpoints/best.safetensors", "checkpoints/best.json"}
    assert set(names) - best == expected and {names[n] for n in set(names) - best} == {1}
    found = {os.path.relpath(p, run) for p in run.rglob("*") if p.is_file()}
    assert found == expected | best | {"run.json", "metrics.csv"}  # run.json: the run id, written when rank 0 opened the folder
    assert not list(tmp_path.rglob("*.tmp"))

    # the summed validation accuracy is the accuracy on the whole test split
    model, bundle = load_trained(policy, run / "model.safetensors")
    x, y = bundle.test.tensors
    # the ranks evaluate strided shards (rank::2, one batch each): forward the same shapes, so the same
    # computation, and the count is exact (one 192-row forward could flip a near-tie)
    with torch.no_grad():
        right = sum(int((model(x[r::2]).argmax(1) == y[r::2]).sum()) for r in (0, 1))
    assert right / len(y) == r0["history"][-1]["val_clean_acc"]


@pytest.mark.serial
def test_cli_under_torchrun(tmp_path):
    policy = tiny_policy(train={"epochs": 1, "probe_examples": 0}, objectives=[{"name": "ce"}])
    policy_file, run = tmp_path / "policy.yaml", tmp_path / "run"
    policy_file.write_text(dump_policy(policy))
    proc = torchrun("-m", "harden", "fit", policy_file, "--out", run, cwd=tmp_path)
    assert proc.stdout.count("trained 1 epoch(s)") == 1  # rank 0 alone reports
    assert (run / "model.safetensors").is_file()
    meta = json.loads((run / "model.json").read_text())
    assert meta["sha256"] == sha256_file(run / "model.safetensors")
    assert not list(run.rglob("*.tmp"))


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed_session("auto") as d:
        assert (d.enabled, d.is_main, d.owns_group) == (False, True, False)
        assert d.shard([1, 2, 3]) == [1, 2, 3]
        assert d.all_sum([1, 2]) == [1.0, 2.0]
        assert d.any(True) and not d.any(False)
    assert not torch.distributed.is_initialized()


def test_bad_world_size_and_device_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(harden.HardenError, match="expected WORLD_SIZE"), distributed_session("cpu"):
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(harden.PolicyError, match="cuda:LOCAL_RANK"), distributed_session("cuda:1"):
        pass


def test_shards_cover_the_validation_set_and_the_probe_once():
    ranks = [Distributed(torch.device("cpu"), rank=r, world_size=3) for r in range(3)]
    shards = [list(d.shard(list(range(10)))) for d in ranks]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert sum(d.share(4, 10) for d in ranks) == 4
    assert sum(d.share(40, 10) for d in ranks) == 10


def test_training_shards_partition_the_data_reproducibly():
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.rand(10, 1, 2, 2), torch.arange(10))
    ranks = [Distributed(torch.device("cpu"), rank=r, world_size=2) for r in range(2)]

    def order(d, epoch, seed=7):
        return [int(i) for _, y in d.train_loader(data, 2, seed, epoch, 0) for i in y]

    assert sorted(order(ranks[0], 0) + order(ranks[1], 0)) == list(range(10))
    assert order(ranks[0], 1) == order(ranks[0], 1)  # replayable (resume)
    assert order(ranks[0], 0) != order(ranks[0], 1)  # reshuffled every epoch
    assert order(ranks[0], 0, seed=8) != order(ranks[0], 0)
    with pytest.raises(harden.DataError, match="DistributedSampler"):
        ranks[0].train_loader(DataLoader(data, batch_size=2), 2, 0, 0, 0)




@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two or more GPUs")
def test_two_gpus_under_nccl_train_one_model(tmp_path):
    policy = tiny_policy(
        device="cuda", data={"batch_size": 32}, train={"epochs": 2, "probe_examples": 32}, objectives=MIX
    )
    policy_file, run, out = tmp_path / "policy.yaml", tmp_path / "run", tmp_path / "out"
    policy_file.write_text(dump_policy(policy))
    out.mkdir()
    # the MI estimators live on each rank's GPU: hash them from host copies
    (tmp_path / "script.py").write_text(SCRIPT.replace("t.detach().contiguous()", "t.detach().cpu().contiguous()"))
    torchrun("script.py", policy_file, run, out, cwd=tmp_path)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weights"] == r1["weights"] and r0["mi"] == r1["mi"]
    assert r0["history"] == r1["history"]
    assert r1["writes"] == []
