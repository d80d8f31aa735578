"""The lock of a run folder: one writer at a time (``.harden.lock``, ``fcntl.flock`` or ``msvcrt.locking``).

:class:`FolderLock` takes an exclusive, non-blocking OS lock on ``folder/.harden.lock`` (never
through a symlink) and writes the holder's pid, host and start time into it; a second process gets
a :class:`~harden.errors.RunFolderError` naming the holder. The OS releases the lock when the
process dies. :func:`hold` is the lock alone, for steps that add files to a run's folder;
:class:`harden.runfolder.RunFolder` takes it before preparing a folder for a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harden.errors import RunFolderError

__all__ = ["LOCK_NAME", "MAX_SMALL_FILE", "FolderLock", "hold", "read_small_json"]

LOCK_NAME = ".harden.lock"
MAX_SMALL_FILE = 1 << 20  # run.json and the lock file are tiny: never read more than this
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open


def read_small_json(path: Path) -> Any:
    """A small JSON document (None: missing); anything else is a :class:`ValueError`.

    The file must be a regular file reached without a symbolic link (a link, FIFO, device or
    folder is a :class:`ValueError`); a FIFO never blocks the open.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "run.json").write_text('{"run_id": "x"}')
        >>> read_small_json(d / "run.json"), read_small_json(d / "none.json")
        ({'run_id': 'x'}, None)
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        if os.path.islink(path):
            raise ValueError("a symbolic link, not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_SMALL_FILE + 1)
    if len(raw) > MAX_SMALL_FILE:
        raise ValueError(f"more than {MAX_SMALL_FILE} bytes")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class FolderLock:
    """An exclusive, non-blocking OS lock on ``folder/.harden.lock``, holding this process's pid."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        for _ in range(20):  # the file may be removed by its last holder between open and lock
            try:  # never through a planted symlink: the lock file is truncated and written
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o666)
            except OSError as exc:
                raise RunFolderError(
                    f"expected to create the lock file {str(self.path)!r}, got {exc.strerror or exc}; "
                    "remove it if it is not a plain file, or use another --out"
                ) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device: never lock, truncate or write it
                os.close(fd)
                raise self._not_plain("not a regular file")
            if not _try_lock(fd):
                os.close(fd)
                raise self._busy(folder)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            _unlock(fd)
            os.close(fd)
        else:  # pragma: no cover - another process keeps replacing the lock file
            raise RunFolderError(f"expected to lock {str(self.path)!r}, got a lock file replaced again and again")
        links = os.fstat(self.fd).st_nlink
        if links != 1:  # a hard link (ln victim.txt .harden.lock): its other name's content would be overwritten
            _unlock(self.fd)
            os.close(self.fd)
            raise self._not_plain(f"a file with {links} hard links")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps(info).encode())

    def _not_plain(self, kind: str) -> RunFolderError:
        return RunFolderError(
            f"expected the lock file {str(self.path)!r} to be a plain file, got {kind}; "
            "remove it (harden creates it), or use another --out"
        )

    def _busy(self, folder: Path) -> RunFolderError:
        try:
            info = read_small_json(self.path)
            holder = f"pid {int(info['pid'])}, started {str(info['started'])[:40]}"
        except (ValueError, TypeError, KeyError, OSError):
            holder = "pid unknown"
        return RunFolderError(
            f"expected no other harden process writing to {str(folder)!r}, got one ({holder}): "
            "wait for it, or use another --out"
        )

    def release(self) -> None:
        """Remove the lock file (while still holding it), then unlock."""
        if sys.platform != "win32":
            self.path.unlink(missing_ok=True)
        _unlock(self.fd)
        os.close(self.fd)
        if sys.platform == "win32":  # pragma: no cover - Windows cannot remove an open file
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)


if sys.platform == "win32":  # pragma: no cover - Windows: a byte-range lock on the lock file
    import msvcrt

    def _try_lock(fd: int) -> bool:
        """Take the exclusive lock without waiting; False when another process holds it."""
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        """Take the exclusive lock without waiting; False when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def hold(path: str | Path) -> Iterator[Path]:
    """Hold the lock of ``path`` (created if missing) for one step adding files to a run, without preparing it.

    ``harden verify`` and ``harden export`` write ``report.json`` / ``model.onnx`` into a run's
    folder: they take the lock so that no run writes there at the same time.

    Example:
        >>> import tempfile
        >>> with hold(tempfile.mkdtemp()) as folder:
        ...     (folder / LOCK_NAME).is_file()
        True
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder)
    try:
        yield folder
    finally:
        lock.release()
