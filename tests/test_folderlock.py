"""harden.folderlock: one writer per run folder; never through a planted symlink; hold() for single steps."""

import os

import pytest

from harden.errors import RunFolderError
from harden.folderlock import LOCK_NAME, FolderLock, hold, read_small_json


def test_a_second_lock_on_the_same_folder_is_refused_and_names_the_holder(tmp_path):
    first = FolderLock(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=rf"pid {os.getpid()}"):
            FolderLock(tmp_path)
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    FolderLock(tmp_path).release()  # free again


def test_hold_locks_for_one_step_and_creates_the_folder(tmp_path):
    with hold(tmp_path / "new") as folder:
        assert folder.is_dir() and (folder / LOCK_NAME).is_file()
        with pytest.raises(RunFolderError, match="another --out"):
            FolderLock(folder)
    assert not (tmp_path / "new" / LOCK_NAME).exists()


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="no O_NOFOLLOW on this platform")
def test_a_planted_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(victim)
    with pytest.raises(RunFolderError, match="not a plain file"):
        FolderLock(folder)
    assert victim.read_text() == "precious"


def test_read_small_json_refuses_big_and_deep_documents(tmp_path):
    path = tmp_path / "x.json"
    assert read_small_json(path) is None
    path.write_text('{"a": 1}')
    assert read_small_json(path) == {"a": 1}
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested"):
        read_small_json(path)
    path.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(ValueError, match="bytes"):
        read_small_json(path)


def test_a_hard_linked_lock_file_is_refused_and_its_other_name_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    os.link(victim, folder / LOCK_NAME)
    with pytest.raises(RunFolderError) as info:
        FolderLock(folder)
    assert "\n" not in str(info.value)
    assert "to be a plain file, got a file with 2 hard links; remove it" in str(info.value)
    assert victim.read_text() == "precious"
    (folder / LOCK_NAME).unlink()
    FolderLock(folder).release()  # the folder can be locked again once the link is gone


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_lock_file_is_refused_without_blocking(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / LOCK_NAME)
    with pytest.raises(RunFolderError, match=r"to be a plain file, got not a regular file; remove it"):
        FolderLock(folder)
    assert (folder / LOCK_NAME).exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_read_small_json_refuses_links_fifos_and_folders(tmp_path):
    real = tmp_path / "real.json"
    real.write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match="symbolic link"):
        read_small_json(tmp_path / "link.json")
    for name in ("fifo.json", "dir.json"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_small_json(tmp_path / name)
    assert read_small_json(real) == {"a": 1}
