"""The run-folder guard: one run folder, one run, one writer.

:meth:`RunFolder.open` prepares a run folder (``--out``) before a run writes into it, and holds it
until :meth:`RunFolder.close` (or the end of its ``with`` block):

- **One writer.** An exclusive, non-blocking lock on ``.harden.lock`` in the folder (``fcntl.flock``;
  ``msvcrt.locking`` where ``fcntl`` is missing). A second process gets a :class:`RunFolderError`
  naming the holder's pid. The lock is released on close, also after an exception or
  ``KeyboardInterrupt``; the OS releases it when the process is killed. The lock file is removed on
  close (a stale one left by a killed process is simply locked again).
- **One run.** A fresh run (``resume=False``) into a *used* folder, one holding any of
  :data:`ARTIFACTS`, is refused unless ``overwrite=True``, which deletes exactly those artifacts
  (in ``checkpoints/`` only harden's checkpoint files, ``epoch-NNNN``/``best`` ``.safetensors`` / ``.json`` and
  their temp files, in ``tensorboard/`` only event files, then the folder if that leaves it empty; other files are never touched). ``run.json`` (written atomically when a run starts) holds the
  run's ``run_id`` (uuid4 hex), the full policy hash, the creation time and the harden version; a
  resume keeps the run id (checkpoints carry it, and a resume refuses another run's). Resuming a
  folder with checkpoints but without ``run.json`` (made by an older harden) is refused.
- **Crash leftovers**, deleted when a writer opens the folder (it holds the lock, so no writer is
  active): the temp files of :func:`harden.checkpoint.atomic_write` for harden's own files
  (``.<artifact>.<8 random>.tmp`` in the folder, ``.epoch-NNNN.<ext>.<8 random>.tmp`` in
  ``checkpoints/``) and the export's temp folders (``.model.onnx.<8 random>``). On resume, the
  final artifacts of the interrupted run, which the run writes again, are deleted too
  (:data:`OUTPUTS`, in this order): ``certificate.json`` (the run's commit marker, written last),
  ``certificate.md``, ``certificate.html``, ``model.onnx`` (valid only with its certificate),
  ``report-onnx.json``, ``report.json``, ``model.json``, ``model.safetensors``. Kept on resume:
  ``checkpoints/``, ``run.json`` (unchanged: it records how the run started) and ``policy.yaml``.
  A resume never follows a link out of the folder: it refuses a ``checkpoints`` that is a
  symbolic link or not a folder, and a ``run.json`` or checkpoint file that is a link or not a
  regular file (it reads them, and writes and prunes in ``checkpoints/``).
- **A failed start leaves nothing.** When a run that this open started (a new ``run.json``) ends with
  an exception before anything resumable exists (no checkpoint sidecar, no ``model.safetensors``),
  harden's :data:`ARTIFACTS` are removed again (e.g. ``run.json``, ``policy.yaml``), and the folder
  too when this open created it and it is left empty. Other files are never deleted.

Under ``torchrun`` only rank 0 writes: other ranks open a *reader* that neither locks nor writes and
reads the run id from ``run.json`` when first asked (after rank 0 has written it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from harden._version import __version__
from harden.checkpoint import CHECKPOINT_TEMP, atomic_write
from harden.errors import RunFolderError
from harden.folderlock import LOCK_NAME, FolderLock, hold, read_small_json

__all__ = ["ARTIFACTS", "LOCK_NAME", "OUTPUTS", "RunFolder", "hold", "process_rank", "used_artifacts"]

#: the files (and the ``checkpoints`` folder) a run writes into its folder: what makes a folder used
ARTIFACTS: tuple[str, ...] = (
    "checkpoints",
    "run.json",
    "policy.yaml",
    "model.safetensors",
    "model.json",
    "report.json",
    "report-onnx.json",
    "model.onnx",
    "certificate.md",
    "certificate.html",
    "certificate.json",
    "metrics.csv",
    "tensorboard",
)
#: the final artifacts a resumed run writes again, deleted when it opens the folder (commit marker first)
OUTPUTS: tuple[str, ...] = (
    "certificate.json",
    "certificate.md",
    "certificate.html",
    "model.onnx",
    "report-onnx.json",
    "report.json",
    "model.json",
    "model.safetensors",
)
RUN_JSON = "run.json"
_RANDOM = r"[a-z0-9_]{8}"  # the random part of tempfile's names
_TEMP_FILE = re.compile(r"^\.(" + "|".join(re.escape(a) for a in ARTIFACTS) + r")\." + _RANDOM + r"\.tmp$")
_CKPT_TEMP = re.compile(r"^\.(epoch-\d{4,}|best)\.(safetensors|json)\." + _RANDOM + r"\.tmp$")
#: harden's checkpoint files and the temp files of their writes (as :mod:`harden.checkpoint` names them)
_CKPT_FILE = re.compile(r"^(epoch-\d{4,}|best)\.(safetensors|json)$")
#: TensorBoard's event files (``tensorboard/``, written by :mod:`harden.metrics_log`)
_TB_EVENTS = re.compile(r"^events\.out\.tfevents\.[\w.\-]+$")
_EXPORT_TEMP = re.compile(r"^\.model\.onnx\." + _RANDOM + "$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def process_rank() -> int:
    """This process's rank in a ``torchrun`` job before :func:`harden.fit` joins it (0 when alone).

    The initialised process group's rank, else ``RANK`` when ``WORLD_SIZE`` > 1, else 0.

    Example:
        >>> process_rank()
        0
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return int(tdist.get_rank())
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return int(os.environ.get("RANK", "0")) if world > 1 else 0
    except ValueError:  # harden.distributed refuses these with its own message
        return 0


def used_artifacts(path: str | Path) -> list[str]:
    """The names of :data:`ARTIFACTS` present in ``path`` (a link counts; nothing is followed).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "notes.txt").write_text("mine"), (d / "model.json").write_text("{}")
        >>> used_artifacts(d)
        ['model.json']
    """
    path = Path(path)
    return [name for name in ARTIFACTS if os.path.lexists(path / name)]


def _remove(path: Path) -> None:
    """Delete a file or a link (not its target); a missing path is fine.

    A folder is ``checkpoints/`` or ``tensorboard/``: only harden's files in it are deleted
    (``epoch-NNNN`` / ``best`` ``.safetensors`` / ``.json`` and the temp files of their writes;
    TensorBoard event files), then the folder itself if that leaves it empty. Other files there
    are the user's and stay.
    """
    if path.is_dir() and not path.is_symlink():
        ours = (_CKPT_FILE, CHECKPOINT_TEMP) if path.name == "checkpoints" else (_TB_EVENTS,)
        for entry in path.iterdir():
            if any(p.match(entry.name) for p in ours) and not entry.is_dir():
                entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty
    elif os.path.lexists(path):
        path.unlink()


class RunFolder:
    """A run folder opened for one run (see the module docstring); a context manager.

    Attributes:
        path: the folder.
        resume: the run continues the folder's run (its checkpoints).
        writer: this process writes (rank 0): it holds the lock.
    """

    def __init__(self, path: Path, resume: bool, writer: bool) -> None:
        self.path = path
        self.resume = resume
        self.writer = writer
        self._run_id: str | None = None
        self._lock: FolderLock | None = None
        self._started = False  # this open wrote a new run.json
        self._created = False  # this open created the folder

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        policy_hash: str = "",
        rank: int | None = None,
    ) -> RunFolder:
        """Lock and prepare ``path`` for a run (rank 0), or open a reader (other ranks).

        Args:
            path: the run folder (created if missing).
            resume: continue the folder's run (keep its run id and checkpoints).
            overwrite: delete harden's artifacts of a previous run first (not with ``resume``).
            policy_hash: the full policy hash, recorded in ``run.json``.
            rank: this process's rank (None: :func:`process_rank`); only rank 0 locks and writes.

        Raises:
            RunFolderError: another process holds the folder, a fresh run into a used folder
                without ``overwrite``, a resume of a folder without ``run.json`` but with
                checkpoints, an unreadable ``run.json``, ``path`` is not a folder, or (resume) a
                ``checkpoints`` that is a link or no folder, or a ``run.json`` or checkpoint file that is
                a link or not a regular file.

        Example:
            >>> import tempfile
            >>> d = Path(tempfile.mkdtemp()) / "run"
            >>> with RunFolder.open(d, policy_hash="abc") as folder:
            ...     len(folder.run_id), sorted(p.name for p in d.iterdir())
            (32, ['.harden.lock', 'run.json'])
            >>> _ = (d / "model.json").write_text("{}")
            >>> RunFolder.open(d)
            Traceback (most recent call last):
            ...
            harden.errors.RunFolderError: expected an unused run folder ..., got one holding model.json, run.json: ...
        """
        path = Path(path)
        if resume and overwrite:
            raise RunFolderError("expected resume or overwrite, got both; choose one")
        if (process_rank() if rank is None else rank) != 0:
            return cls(path, resume, writer=False)
        folder = cls(path, resume, writer=True)
        if os.path.lexists(path) and not path.is_dir():
            raise RunFolderError(f"expected a folder at {str(path)!r}, got a file; use another --out")
        folder._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(
                f"expected to create the run folder {str(path)!r}, got {exc.strerror or exc}"
            ) from None
        folder._lock = FolderLock(path)
        try:
            folder._prepare(overwrite, policy_hash)
        except BaseException:
            folder._release()
            raise
        return folder

    def _prepare(self, overwrite: bool, policy_hash: str) -> None:
        """Clean crash leftovers, check or clear the folder, and read or write ``run.json``."""
        path = self.path
        _clean_leftovers(path)
        used = used_artifacts(path)
        if overwrite:
            for name in sorted(used, key=lambda n: n != "certificate.json"):  # the commit marker first
                _remove(path / name)
        elif not self.resume and used:
            raise RunFolderError(
                f"expected an unused run folder {str(path)!r}, got one holding {', '.join(sorted(used))}: "
                "use --resume to continue its run, --overwrite to replace it, or another --out"
            )
        if self.resume:
            _check_resumable_entries(path)
        record = None if overwrite else self._read_run_json()
        if self.resume:
            if record is None and any((path / "checkpoints").glob("epoch-*.json")):
                raise RunFolderError(
                    f"expected {str(path / RUN_JSON)!r} beside the checkpoints to resume, got none (a folder of an "
                    "older harden): rerun without --resume into another --out, or with --overwrite"
                )
            for name in OUTPUTS:  # rewritten by the resumed run; certificate.json first
                _remove(path / name)
        if record is None:
            record = {
                "run_id": uuid.uuid4().hex,
                "policy_sha256": policy_hash,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "harden_version": __version__,
            }
            atomic_write(path / RUN_JSON, json.dumps(record, indent=1).encode())
            self._started = True
        self._run_id = record["run_id"]

    def _read_run_json(self) -> dict[str, Any] | None:
        """``run.json`` checked (None: missing)."""
        where = self.path / RUN_JSON
        try:
            record = read_small_json(where)
            if record is None:
                return None
            if not isinstance(record, dict) or not _RUN_ID.match(str(record.get("run_id", ""))):
                raise ValueError("no run_id of 32 hex digits")
        except (OSError, ValueError) as exc:
            raise RunFolderError(
                f"expected a valid {str(where)!r}, got {exc}; rerun with --overwrite, or use another --out"
            ) from None
        return record

    @property
    def run_id(self) -> str:
        """The run's id from ``run.json`` ("" for a reader that finds none)."""
        if self._run_id is None:
            record = self._read_run_json()
            self._run_id = "" if record is None else str(record["run_id"])
        return self._run_id

    def close(self, failed: bool = False) -> None:
        """Release the folder; ``failed``: roll back a run this open started that left nothing resumable."""
        if not self.writer or self._lock is None:
            return
        try:
            if failed and self._started and not self._resumable():
                for name in ARTIFACTS:
                    _remove(self.path / name)
        finally:
            self._release()
        if failed and self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    def _resumable(self) -> bool:
        return os.path.lexists(self.path / "model.safetensors") or any((self.path / "checkpoints").glob("epoch-*.json"))

    def _release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    def __repr__(self) -> str:
        role = "writer" if self.writer else "reader"
        return f"RunFolder({str(self.path)!r}, {role}, resume={self.resume})"


def _check_resumable_entries(path: Path) -> None:
    """Refuse what a resume would follow out of the folder: ``checkpoints`` or the files it reads as links.

    A resume reads ``run.json`` and the checkpoints, and writes and prunes in ``checkpoints/``:
    ``checkpoints`` must be a real folder (not a link, not a file), ``run.json`` and the checkpoint
    files regular files (not links, FIFOs or devices).
    """
    checkpoints = path / "checkpoints"
    if checkpoints.is_symlink() or (os.path.lexists(checkpoints) and not checkpoints.is_dir()):
        kind = "a symbolic link" if checkpoints.is_symlink() else "not a folder"
        raise RunFolderError(
            f"expected {str(checkpoints)!r} to be a folder inside the run folder, got {kind}: a resume writes and "
            "deletes checkpoints there; move it aside and rerun, or start over with --overwrite"
        )
    entries = [path / RUN_JSON]
    if checkpoints.is_dir():
        entries += [e for e in checkpoints.iterdir() if _CKPT_FILE.match(e.name)]
    for entry in entries:
        if os.path.lexists(entry) and (entry.is_symlink() or not entry.is_file()):
            kind = "a symbolic link" if entry.is_symlink() else "not a regular file"
            raise RunFolderError(
                f"expected {str(entry)!r} to be a regular file of the run, got {kind}: a resume reads it; "
                "remove it and rerun, or start over with --overwrite"
            )


def _clean_leftovers(path: Path) -> None:
    """Delete the temp files of interrupted atomic writes and the export's temp folders."""
    for entry in path.iterdir():
        if _TEMP_FILE.match(entry.name) and not entry.is_dir():
            entry.unlink(missing_ok=True)
        elif _EXPORT_TEMP.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for entry in checkpoints.iterdir():
            if _CKPT_TEMP.match(entry.name) and not entry.is_dir():
                entry.unlink(missing_ok=True)
