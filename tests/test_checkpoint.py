"""Checkpoints: nested state round trips, hash checks, skipping damaged ones, atomic writes."""

import errno
import hashlib
import json
import os
import stat
import warnings

import pytest
import torch
from helpers_faults import enospc_after

import harden
from harden.checkpoint import (
    atomic_write,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
    sha256_file,
    state_bytes,
    unflatten_state,
    weights_sha256,
)
from harden.testing import TinyCNN


def assert_same(a, b, where="state"):
    """Deep equality with exact tensor comparison and exact container types."""
    if isinstance(a, dict):  # an OrderedDict state_dict comes back as a plain dict
        assert isinstance(b, dict), where
    else:
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def json_round_trip(state):
    tensors = {}
    tree = flatten_state(state, "s", tensors)
    tree = json.loads(json.dumps(tree))  # what the sidecar stores
    return unflatten_state(tree, tensors), tensors


def trained_optimizers():
    torch.manual_seed(0)
    net = TinyCNN(num_classes=3)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    adamw = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(2):
        for opt in (sgd, adamw):
            opt.zero_grad()
            net(torch.rand(4, 1, 8, 8)).logsumexp(1).mean().backward()
            opt.step()
    return net, sgd, adamw


def test_flatten_unflatten_nested_containers():
    state = {
        "t": torch.arange(6, dtype=torch.int64).view(2, 3),
        "tuple": (1.5, "x", None, True, torch.ones(2, dtype=torch.bfloat16)),
        "int_keys": {0: {"step": torch.tensor(3.0)}, 7: [1, 2]},
        "list": [torch.zeros(1, dtype=torch.bool), {"inner": (2, 3)}],
        "float": 0.1,
        "nan": float("nan"),
    }
    back, tensors = json_round_trip(state)
    assert all(k.startswith("s.") for k in tensors)
    nan = back.pop("nan")
    assert nan != nan
    state.pop("nan")
    assert_same(back, state)


def test_flatten_unflatten_optimizer_states():
    net, sgd, adamw = trained_optimizers()
    state = {"model": net.state_dict(), "sgd": sgd.state_dict(), "adamw": adamw.state_dict()}
    assert set(state["adamw"]["state"]) == set(range(len(list(net.parameters()))))  # int keys
    assert isinstance(state["adamw"]["param_groups"][0]["betas"], tuple)
    back, _ = json_round_trip(state)
    assert_same(back, state)
    # the round-tripped state loads into fresh optimizers and gives identical next steps
    net2 = TinyCNN(num_classes=3)
    net2.load_state_dict(back["model"])
    adamw2 = torch.optim.AdamW(net2.parameters(), lr=1.0)
    adamw2.load_state_dict(back["adamw"])
    assert adamw2.param_groups[0]["betas"] == (0.8, 0.99)
    assert adamw2.param_groups[0]["lr"] == 1e-3


def test_flatten_keeps_colliding_keys_apart():
    a, b = torch.zeros(1), torch.ones(1)
    state = {"a.b": a, "a": {"b": b}}  # both would be stored under "s.a.b"
    back, tensors = json_round_trip(state)
    assert len(tensors) == 2
    assert_same(back, state)


def test_flatten_refuses_other_objects():
    with pytest.raises(harden.CheckpointError, match="got object"):
        flatten_state({"x": object()}, "s", {})


def test_flatten_copies_tensors():
    t = torch.zeros(3)
    tensors = {}
    flatten_state({"t": t}, "s", tensors)
    t += 1
    assert torch.equal(tensors["s.t"], torch.zeros(3))


def test_unflatten_unknown_node():
    with pytest.raises(harden.CheckpointError, match="known state node"):
        unflatten_state({"__what__": 1}, {})


def test_save_load_round_trip(tmp_path):
    net, sgd, _ = trained_optimizers()
    state = {"model": net.state_dict(), "optimizer": sgd.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    info = {"history": [{"epoch": 1, "loss": 0.5}], "policy_hash": "abc"}
    sidecar = save_checkpoint(tmp_path / "ck", 3, state, info)
    assert sidecar == tmp_path / "ck" / "epoch-0003.json"
    assert (tmp_path / "ck" / "epoch-0003.safetensors").is_file()
    meta = json.loads(sidecar.read_text())
    blob = (tmp_path / "ck" / "epoch-0003.safetensors").read_bytes()
    assert meta["format"] == 2 and meta["size"] == len(blob)
    # one digest over the tensor file's bytes and the canonical sidecar without its sha256
    canonical = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    assert meta["sha256"] == hashlib.sha256(blob + canonical.encode()).hexdigest()
    assert meta["sha256"] != sha256_file(tmp_path / "ck" / "epoch-0003.safetensors")
    epoch, back, back_info = load_checkpoint(sidecar)
    assert epoch == 3
    assert back_info == info
    assert_same(back, state)


def save_epochs(directory, epochs):
    for e in epochs:
        save_checkpoint(directory, e, {"w": torch.full((4,), float(e))}, {"epoch": e})


def test_list_checkpoints_sorts_by_epoch(tmp_path):
    save_epochs(tmp_path, [10, 2, 1])
    (tmp_path / "epoch-xx.json").write_text("{}")
    (tmp_path / "notes.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001.json", "epoch-0002.json", "epoch-0010.json"]
    assert list_checkpoints(tmp_path / "missing") == []
    assert load_latest(tmp_path / "missing") is None


def test_truncated_tensor_file_is_detected(tmp_path):
    save_epochs(tmp_path, [1])
    blob_path = tmp_path / "epoch-0001.safetensors"
    blob_path.write_bytes(blob_path.read_bytes()[:-7])
    with pytest.raises(harden.CheckpointError, match="truncated or modified"):
        load_checkpoint(tmp_path / "epoch-0001.json")


def test_one_modified_byte_is_detected(tmp_path):
    save_epochs(tmp_path, [1])
    blob_path = tmp_path / "epoch-0001.safetensors"
    data = bytearray(blob_path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: still a valid safetensors file
    blob_path.write_bytes(bytes(data))
    with pytest.raises(harden.CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "epoch-0001.json")


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: "{not json",
        lambda meta: json.dumps({**meta, "format": 99}),
        lambda meta: json.dumps({k: v for k, v in meta.items() if k != "file"}),
        lambda meta: json.dumps({**meta, "file": "../elsewhere.safetensors"}),
        lambda meta: json.dumps({**meta, "state": {"__dict__": {"w": {"__tensor__": "s.nope"}}}}),
        lambda meta: json.dumps({k: v for k, v in meta.items() if k != "epoch"}),
        lambda meta: json.dumps([meta]),
        lambda meta: "[" * 100_000 + "]" * 100_000,
    ],
)
def test_damaged_sidecar_is_a_checkpoint_error(tmp_path, damage):
    save_epochs(tmp_path, [1])
    sidecar = tmp_path / "epoch-0001.json"
    sidecar.write_text(damage(json.loads(sidecar.read_text())))
    with pytest.raises(harden.CheckpointError):
        load_checkpoint(sidecar)


SIDECAR_EDITS = {
    "epoch": lambda m: m.update(epoch=m["epoch"] + 1),
    "lr": lambda m: m["info"]["history"][0].update(lr=0.5),
    "val_clean_acc": lambda m: m["info"]["history"][0].update(val_clean_acc=1.0),
    "run_id": lambda m: m["info"].update(run_id="ab" * 16),
    "resume_hash": lambda m: m["info"].update(resume_hash="0" * 64),
    "new info key": lambda m: m["info"].update(note="x"),
    "state tree": lambda m: m["state"]["__dict__"].update(extra=1),
    "size": lambda m: m.update(size=m["size"] - 1),
    "float spelling": lambda m: m["info"]["history"][0].update(lr=0.10000000000000002),
}


@pytest.mark.parametrize("edit", list(SIDECAR_EDITS))
def test_any_edit_of_the_sidecar_is_rejected(tmp_path, edit):
    info = {"history": [{"epoch": 1, "lr": 0.1, "val_clean_acc": 0.5}], "run_id": "cd" * 16, "resume_hash": "r"}
    sidecar = save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)}, info)
    assert load_checkpoint(sidecar)[2] == info
    meta = json.loads(sidecar.read_text())
    SIDECAR_EDITS[edit](meta)
    sidecar.write_text(json.dumps(meta, indent=1))  # the tensor file is untouched
    with pytest.raises(harden.CheckpointError, match="truncated or modified"):
        load_checkpoint(sidecar)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint epoch-0001.json"):
        assert load_latest(tmp_path) is None


def test_reformatting_the_sidecar_keeps_it_valid(tmp_path):
    sidecar = save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)}, {"history": [{"lr": 0.1}]})
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(reversed(list(meta.items())))))  # other key order, no indent
    assert load_checkpoint(sidecar)[2] == {"history": [{"lr": 0.1}]}


def test_a_format_1_checkpoint_is_refused(tmp_path):
    sidecar = save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)}, {})
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(harden.CheckpointError, match=r"expected checkpoint format 2 .* got 1"):
        load_checkpoint(sidecar)


def test_missing_tensor_file(tmp_path):
    save_epochs(tmp_path, [1])
    (tmp_path / "epoch-0001.safetensors").unlink()
    with pytest.raises(harden.CheckpointError, match="readable checkpoint"):
        load_checkpoint(tmp_path / "epoch-0001.json")


def test_load_latest_skips_the_corrupt_newest(tmp_path):
    save_epochs(tmp_path, [1, 2, 3])
    blob_path = tmp_path / "epoch-0003.safetensors"
    blob_path.write_bytes(blob_path.read_bytes()[:20])
    with pytest.warns(RuntimeWarning, match="skipping checkpoint epoch-0003.json") as record:
        found = load_latest(tmp_path)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert found is not None
    epoch, state, info = found
    assert epoch == 2
    assert torch.equal(state["w"], torch.full((4,), 2.0))
    assert info == {"epoch": 2}


def test_load_latest_without_damage_does_not_warn(tmp_path):
    save_epochs(tmp_path, [1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest(tmp_path)[0] == 2


def test_load_latest_all_corrupt(tmp_path):
    save_epochs(tmp_path, [1, 2])
    for e in (1, 2):
        (tmp_path / f"epoch-000{e}.safetensors").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning):
        assert load_latest(tmp_path) is None


@pytest.mark.parametrize(("keep", "left"), [(2, [4, 5]), (1, [5]), (10, [1, 2, 3, 4, 5]), (0, [])])
def test_prune_keeps_the_newest(tmp_path, keep, left):
    save_epochs(tmp_path, [1, 2, 3, 4, 5])
    prune_checkpoints(tmp_path, keep)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"epoch-{e:04d}.json" for e in left]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"epoch-{e:04d}.safetensors" for e in left]


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write(target, b"old")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(harden.CheckpointError, match="No space left on device"):
        atomic_write(target, b"new")
    with pytest.raises(harden.CheckpointError):
        atomic_write(tmp_path / "fresh.bin", b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no temp or partial file


def test_atomic_write_refuses_text_and_leaves_nothing(tmp_path):
    with pytest.raises(harden.CheckpointError, match="expected bytes"):
        atomic_write(tmp_path / "f.txt", "text")
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_failure_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(harden.CheckpointError):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert load_latest(tmp_path) is None


def test_weights_hash_matches_the_written_bytes(tmp_path):
    net = TinyCNN(num_classes=3)
    blob = state_bytes(net)
    atomic_write(tmp_path / "model.safetensors", blob)
    assert weights_sha256(net) == sha256_file(tmp_path / "model.safetensors")
    assert state_bytes(net) == blob  # deterministic
    with torch.no_grad():
        net.head.bias.add_(1)
    assert weights_sha256(net) != sha256_file(tmp_path / "model.safetensors")


def test_prune_removes_temp_files_a_killed_write_left(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {})
    (tmp_path / ".epoch-0002.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".epoch-0002.json.xyz.tmp").write_bytes(b"{")
    (tmp_path / "notes.tmp").write_text("not ours")
    prune_checkpoints(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.json", "epoch-0001.safetensors", "notes.tmp"]


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    atomic_write(target, b"old weights")
    monkeypatch.setattr(os, "write", enospc_after(0))
    with pytest.raises(harden.CheckpointError, match=r"got a full disk \(No space left on device\)") as info:
        atomic_write(target, b"new weights" * 1000)
    assert "nothing was written" in str(info.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_full_disk_when_the_temp_file_cannot_be_created(tmp_path, monkeypatch):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("tempfile.mkstemp", no_inode)
    with pytest.raises(harden.CheckpointError, match="full disk"):
        atomic_write(tmp_path / "f.bin", b"x")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_open_would_give_them(tmp_path, umask, mode):
    old = os.umask(umask)  # read from /proc/self/status on each write: follows the change
    try:
        atomic_write(tmp_path / "a.bin", b"x")
        save_checkpoint(tmp_path / "ck", 1, {"w": torch.zeros(1)}, {})
        with open(tmp_path / "plain.bin", "wb"):  # what open() gives, for comparison
            pass
    finally:
        os.umask(old)
    files = [tmp_path / "a.bin", *(tmp_path / "ck").iterdir()]
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in files] == [oct(mode)] * 3
    assert stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == mode


def test_the_best_checkpoint_is_never_listed_nor_pruned(tmp_path):
    from harden.checkpoint import BEST_STEM, CHECKPOINT_TEMP

    for epoch in (1, 2):
        save_checkpoint(tmp_path, epoch, {"w": torch.full((2,), float(epoch))}, {})
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {"val_pgd_acc": 0.5}, stem=BEST_STEM)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001.json", "epoch-0002.json"]
    prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.json", "best.safetensors", "epoch-0002.json", "epoch-0002.safetensors"
    ]
    epoch, state, info = load_checkpoint(tmp_path / "best.json")
    assert (epoch, info, state["model"]["w"].tolist()) == (1, {"val_pgd_acc": 0.5}, [1.0, 1.0])
    assert CHECKPOINT_TEMP.match(".best.safetensors.abcd1234.tmp") and not CHECKPOINT_TEMP.match(".bests.json.x.tmp")
