"""Per-epoch metrics of a fit as ``metrics.csv`` and, where wanted, TensorBoard events.

:class:`MetricsLog` writes one CSV row per epoch into ``metrics.csv`` of the run folder: the
column ``epoch`` first, then every other key of the history records in the order they first
appear (``lr``, ``train_loss``, each objective's loss, ``skipped_steps``, ``val_clean_acc``,
``val_pgd_acc``, ``seconds``). A row is appended, flushed and fsynced when its epoch ends, so a
crash loses at most the epoch under way; a resumed fit rewrites the file from the history its
checkpoint restored, so rows of epochs trained after that checkpoint are dropped and each epoch
has one row. The same numbers go to TensorBoard (``tensorboard/`` of the run folder, step = the
epoch) when ``train.tensorboard`` asks for it: None when the ``tensorboard`` package imports,
True always (a :class:`~harden.errors.PolicyError` without it, raised when the log is made),
False never. Events of epochs after the resumed one are purged (TensorBoard's ``purge_step``).
Nothing is written before the first record (a fit that fails before its first epoch ends
leaves no metrics behind).

The files are never read back, and never written through a link: the CSV is recreated
(``O_EXCL | O_NOFOLLOW``) rather than truncated.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from harden.errors import PolicyError, RunFolderError

__all__ = ["CSV_NAME", "TENSORBOARD_DIR", "MetricsLog", "summary_writer_class"]

#: the metrics file in the run folder
CSV_NAME = "metrics.csv"
#: the TensorBoard log folder in the run folder
TENSORBOARD_DIR = "tensorboard"


def summary_writer_class(tensorboard: bool | None) -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` when ``tensorboard`` asks for it, else None.

    None: the writer when the package imports (else None); True: the writer, or an error;
    False: None.

    Raises:
        PolicyError: ``tensorboard`` is True and the package does not import.

    Example:
        >>> summary_writer_class(False) is None
        True
    """
    if tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if tensorboard is None:
            return None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PolicyError(
            f"expected the tensorboard package for train.tensorboard: true, got an import error ({reason}); "
            "pip install tensorboard, or set train.tensorboard to null or false"
        ) from None
    return SummaryWriter


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``epoch``, then every other key of ``rows`` in the order it first appears."""
    columns = ["epoch"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _cell(value: Any) -> Any:
    """A CSV cell: numbers at full precision (``repr``), None as empty, anything else as text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


class MetricsLog:
    """``metrics.csv`` and TensorBoard events of one fit (nothing at all without a run folder).

    Args:
        run_dir: the run folder; None writes nothing (e.g. every rank but 0 under ``torchrun``).
        tensorboard: ``train.tensorboard`` (see :func:`summary_writer_class`).
        history: the records of epochs already done (a resumed fit's restored history): the CSV
            starts with them, and TensorBoard hides events of later epochs.

    Attributes:
        csv_path: ``run_dir / "metrics.csv"`` (None without a run folder).
        tensorboard_dir: ``run_dir / "tensorboard"`` when events are written, else None.

    Raises:
        PolicyError: ``tensorboard`` is True without the package.
        RunFolderError: ``metrics.csv`` or ``tensorboard`` cannot be (re)created in the folder
            (e.g. a folder named ``metrics.csv``, or a ``tensorboard`` that is a link).

    Example:
        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> with MetricsLog(run_dir, tensorboard=False) as metrics:
        ...     metrics.log({"epoch": 1, "train_loss": 0.5, "val_clean_acc": 0.75})
        >>> (run_dir / "metrics.csv").read_text().splitlines()
        ['epoch,train_loss,val_clean_acc', '1,0.5,0.75']
    """

    def __init__(
        self, run_dir: str | Path | None, *, tensorboard: bool | None = None, history: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.csv_path: Path | None = None
        self.tensorboard_dir: Path | None = None
        self._rows = [dict(r) for r in history]
        self._columns = _columns(self._rows)
        self._file: io.TextIOWrapper | None = None
        self._writer: Any = None
        self._writer_class: Any = None
        self._closed = False
        if run_dir is None:
            return
        self._writer_class = summary_writer_class(tensorboard)  # checked now, before any epoch trains
        self.csv_path = Path(run_dir) / CSV_NAME

    def _open_tensorboard(self, run_dir: Path, writer_class: Any) -> None:
        """The SummaryWriter in ``run_dir/tensorboard`` (refused when that is a link or a file)."""
        folder = run_dir / TENSORBOARD_DIR
        if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
            kind = "a symbolic link" if folder.is_symlink() else "not a folder"
            raise RunFolderError(
                f"expected {str(folder)!r} to be a folder of the run, got {kind}: move it aside and rerun"
            )
        last = max((int(r["epoch"]) for r in self._rows if isinstance(r.get("epoch"), int)), default=0)
        # purge_step: events of the epochs after the restored history (a killed run's) are hidden
        self._writer = writer_class(log_dir=str(folder), purge_step=last + 1)
        self.tensorboard_dir = folder

    def _rewrite(self, path: Path) -> None:
        """Recreate the CSV with the header and every row so far (never through a link, never a FIFO)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            if os.path.lexists(path):
                path.unlink()  # a link goes, not its target
            fd = os.open(path, flags, 0o666)  # the umask applies, as for open()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise RunFolderError(
                f"expected to write {str(path)!r}, got {reason}; move it aside (a run writes its metrics there) "
                "and rerun"
            ) from None
        self._file = open(fd, "w", encoding="utf-8", newline="")  # noqa: SIM115 - held until close()
        self._write_rows(self._file, [self._columns, *([_cell(r.get(c)) for c in self._columns] for r in self._rows)])

    @staticmethod
    def _write_rows(fh: io.TextIOWrapper, rows: Sequence[Sequence[Any]]) -> None:
        csv.writer(fh, lineterminator="\n").writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())

    def log(self, record: Mapping[str, Any]) -> None:
        """Add one epoch's record: a CSV row (flushed, fsynced) and its numbers as TensorBoard scalars."""
        if self.csv_path is None:
            return
        self._rows.append(dict(record))
        if self._file is None or any(k not in self._columns for k in record):  # a new key: a new header
            self._columns = _columns(self._rows)
            self._rewrite(self.csv_path)
        else:
            self._write_rows(self._file, [[_cell(record.get(c)) for c in self._columns]])
        if self._writer is None and self._writer_class is not None:
            self._open_tensorboard(self.csv_path.parent, self._writer_class)
        if self._writer is not None:
            step = record.get("epoch")
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        """Close the CSV and the TensorBoard writer (flushing both).

        A log that got no record writes the CSV of its ``history`` now (a resumed fit with no
        epoch left to train), so the file never keeps rows of epochs the history dropped.
        """
        if self.csv_path is not None and self._file is None and self._rows and not self._closed:
            self._rewrite(self.csv_path)
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
