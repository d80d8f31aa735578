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
