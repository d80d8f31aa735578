"""harden.runfolder: one writer per run folder, one run per folder, crash leftovers cleaned, run.json."""

import json
import multiprocessing
import os
import signal

import pytest

import harden
from harden.runfolder import ARTIFACTS, LOCK_NAME, OUTPUTS, RunFolder, used_artifacts


def hold(path, conn):
    """In a forked process: open ``path``, send the run id, hold the folder until told (or killed)."""
    with RunFolder.open(path, policy_hash="h") as folder:
        conn.send(folder.run_id)
        conn.recv()


def fill(folder, names=ARTIFACTS):
    """Put one of each named harden artifact into ``folder`` (checkpoints/ with a sidecar)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "checkpoints":
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "epoch-0001.json").write_text("{}")
        elif name == "run.json":
            (folder / name).write_text(json.dumps({"run_id": "ab" * 16}))
        else:
            (folder / name).write_text(name)


def test_a_fresh_run_writes_run_json_and_holds_the_lock(tmp_path):
    out = tmp_path / "run"
    with RunFolder.open(out, policy_hash="f" * 64) as folder:
        assert folder.writer and not folder.resume and folder.path == out
        assert (out / LOCK_NAME).is_file()
        record = json.loads((out / "run.json").read_text())
        assert set(record) == {"run_id", "policy_sha256", "created", "harden_version"}
        assert record["run_id"] == folder.run_id and len(folder.run_id) == 32
        int(folder.run_id, 16)  # hex
        assert record["policy_sha256"] == "f" * 64
        assert record["harden_version"] == harden.__version__
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # the lock file went with the lock


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a process holding the folder")
def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")  # the child has harden imported already: fast
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=hold, args=(out, child))
    proc.start()
    try:
        assert parent.poll(30), "the holder did not open the folder"
        run_id = parent.recv()
        with pytest.raises(harden.RunFolderError, match=rf"got one \(pid {proc.pid}, started .*\): wait for it"):
            RunFolder.open(out, resume=True)
        with pytest.raises(harden.RunFolderError, match="no other harden process"):
            RunFolder.open(out, overwrite=True)  # nothing is deleted under a writer
        assert (out / "run.json").is_file()
        proc.kill()  # SIGKILL: the OS releases the lock of a killed process
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        assert (out / LOCK_NAME).exists()  # left behind by the kill, and harmless
        with RunFolder.open(out, resume=True) as folder:
            assert folder.run_id == run_id
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, harden.DataError])
def test_the_lock_is_released_after_an_exception(tmp_path, interrupt):
    out = tmp_path / "run"
    fill(out, ["run.json", "checkpoints"])  # something resumable: the run is kept
    with pytest.raises(interrupt), RunFolder.open(out, resume=True):
        raise interrupt("stop")
    assert not (out / LOCK_NAME).exists()
    with RunFolder.open(out, resume=True) as again:  # not locked any more
        assert again.writer


def test_a_used_folder_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    for name in ARTIFACTS:
        fill(out, [name])
        with pytest.raises(harden.RunFolderError) as info:
            RunFolder.open(out)
        msg = str(info.value)
        assert msg.startswith(f"expected an unused run folder {str(out)!r}, got one holding {name}")
        assert "--resume" in msg and "--overwrite" in msg and "another --out" in msg
        assert "\n" not in msg
        assert not (out / LOCK_NAME).exists()
        for p in list(out.iterdir()):
            (p / "epoch-0001.json").unlink() if p.is_dir() else None
            p.rmdir() if p.is_dir() else p.unlink()


def test_unrelated_files_do_not_make_a_folder_used(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / LOCK_NAME).write_text("a stale lock file")
    assert used_artifacts(out) == []
    with RunFolder.open(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["data", "notes.txt", "run.json"]


def test_overwrite_removes_exactly_hardens_artifacts(tmp_path):
    out = tmp_path / "run"
    fill(out)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "model.onnx").write_text("not in the run folder itself")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    os.symlink(elsewhere, out / "checkpoints-link")  # not an artifact name: untouched
    (out / "checkpoints" / "epoch-0001.json").unlink()
    (out / "checkpoints").rmdir()
    os.symlink(elsewhere, out / "checkpoints")  # an artifact that is a link: the link goes, not its target
    with RunFolder.open(out, overwrite=True) as folder:
        assert json.loads((out / "run.json").read_text())["run_id"] == folder.run_id != "ab" * 16
    left = sorted(p.name for p in out.iterdir())
    assert left == ["checkpoints-link", "mine", "notes.txt", "run.json"]
    assert (out / "mine" / "model.onnx").is_file() and (elsewhere / "keep.txt").is_file()


def test_crash_leftovers_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    fill(out, ["run.json", "checkpoints"])
    leftovers = [".report.json.k2x9a_0b.tmp", ".model.safetensors.abcdefgh.tmp", ".run.json.zz99yy88.tmp"]
    for name in leftovers:
        (out / name).write_bytes(b"half")
    (out / ".model.onnx.q1w2e3r4").mkdir()
    (out / ".model.onnx.q1w2e3r4" / "model.onnx").write_bytes(b"half an export")
    (out / "checkpoints" / ".epoch-0002.safetensors.a1b2c3d4.tmp").write_bytes(b"half")
    keep = [".notes.txt.abcdefgh.tmp", ".model.onnx.bak", "model.onnx.tmp", "x.tmp"]
    for name in keep:
        (out / name).write_text("mine")
    with RunFolder.open(out, resume=True):
        names = {p.name for p in out.iterdir()}
        assert names == {"checkpoints", "run.json", LOCK_NAME, *keep}
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001.json"]


def test_resume_keeps_the_run_and_deletes_the_final_artifacts(tmp_path):
    out = tmp_path / "run"
    fill(out)
    with RunFolder.open(out, resume=True, policy_hash="new") as folder:
        assert folder.resume and folder.run_id == "ab" * 16
        assert sorted(used_artifacts(out)) == sorted(set(ARTIFACTS) - set(OUTPUTS))
    assert {"certificate.json", "model.onnx"} <= set(OUTPUTS)
    assert json.loads((out / "run.json").read_text()) == {"run_id": "ab" * 16}  # untouched


def test_resume_of_an_older_folder_with_checkpoints_but_no_run_json_is_refused(tmp_path):
    out = tmp_path / "run"
    fill(out, ["checkpoints", "model.safetensors"])
    with pytest.raises(harden.RunFolderError, match=r"run\.json' beside the checkpoints to resume, got none"):
        RunFolder.open(out, resume=True)
    assert (out / "model.safetensors").is_file()  # refused before anything was deleted


def test_resume_of_an_empty_folder_starts_a_run(tmp_path):
    with RunFolder.open(tmp_path / "new", resume=True) as folder:
        assert len(folder.run_id) == 32
        assert (tmp_path / "new" / "run.json").is_file()


@pytest.mark.parametrize(
    "content", ["{not json", json.dumps({"run_id": "../../x"}), json.dumps([1]), "[" * 100_000, "x" * (2 << 20)]
)
def test_a_bad_run_json_is_one_error_line(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(content)
    with pytest.raises(harden.RunFolderError, match=r"expected a valid '.*run\.json', got .*--overwrite") as info:
        RunFolder.open(out, resume=True)
    assert "\n" not in str(info.value)
    with RunFolder.open(out, overwrite=True) as folder:  # the remedy works
        assert len(folder.run_id) == 32


def test_other_ranks_neither_lock_nor_write(tmp_path):
    out = tmp_path / "run"
    reader = RunFolder.open(out, rank=1)
    assert not reader.writer and not out.exists()
    assert reader.run_id == ""  # rank 0 has not written run.json (yet)
    with RunFolder.open(out, rank=0) as writer:
        late = RunFolder.open(out, rank=1)
        assert late.run_id == writer.run_id  # read when first asked
        with late:  # closing a reader releases nothing
            pass
        assert (out / LOCK_NAME).exists()


def test_a_failed_fresh_start_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(harden.DataError), RunFolder.open(out):
        (out / "policy.yaml").write_text("x")
        raise harden.DataError("bad data")
    assert not out.exists() and (tmp_path / "new").is_dir()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(harden.DataError), RunFolder.open(kept):
        raise harden.DataError("bad data")
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]

    resumable = tmp_path / "resumable"
    with pytest.raises(harden.DataError), RunFolder.open(resumable):
        fill(resumable, ["checkpoints"])
        raise harden.DataError("killed in epoch 2")
    assert sorted(used_artifacts(resumable)) == ["checkpoints", "run.json"]  # kept, to resume


def test_refused_arguments_and_paths(tmp_path):
    with pytest.raises(harden.RunFolderError, match="resume or overwrite, got both"):
        RunFolder.open(tmp_path, resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(harden.RunFolderError, match=r"expected a folder at .*, got a file"):
        RunFolder.open(tmp_path / "file")


def test_the_rank_comes_from_torchrun_s_environment(tmp_path, monkeypatch):
    from harden.runfolder import process_rank

    monkeypatch.setenv("RANK", "1")
    assert process_rank() == 0  # RANK alone (WORLD_SIZE unset) is not a torchrun job
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_rank() == 1
    reader = RunFolder.open(tmp_path / "run")
    assert not reader.writer and not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    with RunFolder.open(tmp_path / "run") as writer:
        assert writer.writer


def test_overwrite_deletes_only_hardens_checkpoint_files(tmp_path):
    out = tmp_path / "run"
    fill(out)
    ckpt = out / "checkpoints"
    for name in (
        "epoch-0002.safetensors",
        "epoch-10000.json",
        ".epoch-0003.json.ab12cd34.tmp",
        ".epoch-0003.safetensors.x.tmp",
    ):
        (ckpt / name).write_text("harden's")
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / "epoch-0001.json.bak").write_text("mine too")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "epoch-0004.json").write_text("in a subfolder: mine")
    with RunFolder.open(out, overwrite=True):
        assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0001.json.bak", "notes.txt", "sub"]
    assert (ckpt / "notes.txt").read_text() == "mine"
    assert (ckpt / "sub" / "epoch-0004.json").read_text() == "in a subfolder: mine"


def test_overwrite_deletes_the_best_checkpoint_metrics_and_tensorboard_events_only(tmp_path):
    out = tmp_path / "run"
    fill(out, ["run.json", "checkpoints", "metrics.csv"])
    for name in ("best.safetensors", "best.json", ".best.json.ab12cd34.tmp"):
        (out / "checkpoints" / name).write_text("harden's")
    (out / "checkpoints" / "best.txt").write_text("mine")
    board = out / "tensorboard"
    board.mkdir()
    (board / "events.out.tfevents.1700000000.host.123.0").write_text("harden's")
    (board / "notes.txt").write_text("mine")
    with RunFolder.open(out, overwrite=True):
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.txt"]
        assert sorted(p.name for p in board.iterdir()) == ["notes.txt"]
        assert not (out / "metrics.csv").exists()


def test_overwrite_removes_a_checkpoints_folder_left_empty(tmp_path):
    out = tmp_path / "run"
    fill(out)
    (out / "checkpoints" / "epoch-0001.safetensors").write_text("x")
    with RunFolder.open(out, overwrite=True):
        assert not os.path.lexists(out / "checkpoints")


def _resumable(tmp_path):
    out = tmp_path / "run"
    with RunFolder.open(out, policy_hash="h"):
        (out / "checkpoints").mkdir()
    return out


def test_resume_refuses_a_symlinked_checkpoints_folder(tmp_path):
    out = _resumable(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "epoch-0001.json").write_text("{}")
    (out / "checkpoints").rmdir()
    (out / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(harden.RunFolderError) as info:
        RunFolder.open(out, resume=True)
    msg = str(info.value)
    assert "\n" not in msg and "got a symbolic link" in msg and "--overwrite" in msg
    assert (elsewhere / "epoch-0001.json").read_text() == "{}"
    assert not (out / LOCK_NAME).exists()  # the lock was let go


def test_resume_refuses_a_checkpoints_file(tmp_path):
    out = _resumable(tmp_path)
    (out / "checkpoints").rmdir()
    (out / "checkpoints").write_text("not a folder")
    with pytest.raises(
        harden.RunFolderError, match=r"checkpoints' to be a folder inside the run folder, got not a folder"
    ):
        RunFolder.open(out, resume=True)


@pytest.mark.parametrize("name", ["run.json", "checkpoints/epoch-0001.json", "checkpoints/epoch-0001.safetensors"])
def test_resume_refuses_a_symlinked_file_it_reads(tmp_path, name):
    out = _resumable(tmp_path)
    target = tmp_path / "target"
    if name == "run.json":
        (out / "run.json").rename(target)
    else:
        target.write_text("{}")
    (out / name).symlink_to(target)
    with pytest.raises(harden.RunFolderError) as info:
        RunFolder.open(out, resume=True)
    assert "\n" not in str(info.value)
    assert f"expected {str(out / name)!r} to be a regular file of the run, got a symbolic link" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_resume_refuses_a_fifo_checkpoint_without_blocking(tmp_path):
    out = _resumable(tmp_path)
    os.mkfifo(out / "checkpoints" / "epoch-0001.json")
    with pytest.raises(harden.RunFolderError, match=r"got not a regular file: a resume reads it"):
        RunFolder.open(out, resume=True)


def test_a_symlinked_model_file_is_still_just_deleted_on_resume(tmp_path):
    out = _resumable(tmp_path)
    target = tmp_path / "weights"
    target.write_text("mine")
    (out / "model.safetensors").symlink_to(target)  # not read by a resume: the link goes, not its target
    with RunFolder.open(out, resume=True):
        assert not os.path.lexists(out / "model.safetensors")
    assert target.read_text() == "mine"
