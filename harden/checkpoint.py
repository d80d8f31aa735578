"""Checkpoints: safetensors for every tensor, a JSON sidecar for everything else.

A checkpoint ``epoch-0003`` is two files, each written atomically (temp file, fsync, rename):
``epoch-0003.safetensors`` then ``epoch-0003.json``. The sidecar's ``sha256`` is one digest over
both: the tensor file's bytes followed by the canonical JSON (sorted keys, compact) of the sidecar
without that field (which records the tensor file's ``size``, so the boundary is fixed). A
truncated or tampered tensor file, and any edit of the sidecar (epoch, lr, history, validation
accuracy, run id...), is detected and the checkpoint skipped. Nothing is ever unpickled: nested
state (optimizer, scheduler, RNG) is split into tensors and JSON.

The best epoch's weights (``train.keep_best``) are a checkpoint of the same format named
``best`` (``best.safetensors`` / ``best.json``, :data:`BEST_STEM`), which
:func:`list_checkpoints` and :func:`prune_checkpoints` leave alone.

Every file harden writes through :func:`atomic_write` gets mode ``0o666 & ~umask``, as ``open()``
would give it (see :func:`file_mode`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from harden.errors import CheckpointError

__all__ = [
    "BEST_STEM",
    "CHECKPOINT_TEMP",
    "atomic_write",
    "file_mode",
    "flatten_state",
    "fsync_dir",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "save_checkpoint",
    "sha256_file",
    "state_bytes",
    "unflatten_state",
    "weights_sha256",
]

#: 2: the sidecar's ``sha256`` covers the sidecar too (and it records ``size``); info has run_id
FORMAT_VERSION = 2
_NAME = re.compile(r"^epoch-(\d{4,})\.json$")
#: the stem of the best epoch's checkpoint (``best.safetensors`` and ``best.json``)
BEST_STEM = "best"
#: temp files of an interrupted :func:`atomic_write` of a checkpoint (e.g. after SIGKILL)
CHECKPOINT_TEMP = re.compile(r"^\.(epoch-\d{4,}|best)\.(safetensors|json)\..+\.tmp$")
_DISK_FULL = frozenset(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if e is not None)


def _read_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux), else the umask at import."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _umask_at_import() -> int:
    """The umask when harden was imported (os.umask must set it to read it: once, at import)."""
    old = os.umask(0o022)
    os.umask(old)
    return old & 0o777


_IMPORT_UMASK = _umask_at_import()


def file_mode() -> int:
    """The mode of a new file, as ``open()`` creates it: ``0o666 & ~umask``.

    The umask is read from ``/proc/self/status`` where there is one (thread-safe, follows later
    changes), else the umask at import.

    Example:
        >>> file_mode() & 0o200  # the owner can write (unless the umask forbids it)
        128
    """
    return 0o666 & ~_read_umask()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_bytes(module: torch.nn.Module) -> bytes:
    """The safetensors serialization of a module's state dict (deterministic for equal weights)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    return st_save(state)


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of :func:`state_bytes`; equals the hash of the ``model.safetensors`` harden writes."""
    return hashlib.sha256(state_bytes(module)).hexdigest()


def _write_failure(path: Path, exc: OSError) -> CheckpointError:
    """A :class:`CheckpointError` for a failed write, naming a full disk as such."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in _DISK_FULL:
        return CheckpointError(
            f"expected to write {str(path)!r}, got a full disk ({reason}); nothing was written: free space and "
            "rerun (fit: with --resume to continue from the last checkpoint)"
        )
    return CheckpointError(f"expected to write {str(path)!r}, got {reason}; nothing was written")


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The bytes go to a temp file beside ``path`` (``os.write`` until all are written, then
    ``fsync``), which gets mode :func:`file_mode` (not ``mkstemp``'s 0600) and is renamed over
    ``path``; the directory is fsynced too.

    Raises:
        CheckpointError: the write failed (e.g. a full disk, named as such); no temp or partial
            file is left behind and an existing ``path`` is unchanged.
    """
    path = Path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointError(f"expected bytes to write to {str(path)!r}, got {type(data).__name__}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_failure(path, exc) from None
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                written = os.write(fd, view)
                if written <= 0:  # pragma: no cover - os.write raises rather than write nothing
                    raise OSError(errno.EIO, "write made no progress")
                view = view[written:]
            if hasattr(os, "fchmod"):
                os.fchmod(fd, file_mode())
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:  # also KeyboardInterrupt: never leave the temp file behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_failure(path, exc) from None
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Flush a folder's entries to disk (after a rename into it); a no-op where the OS refuses.

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems (and Windows) refuse a folder fsync
        pass


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Split nested state into a JSON-able tree and a flat ``{key: tensor}`` dict.

    Example:
        >>> t: dict[str, torch.Tensor] = {}
        >>> tree = flatten_state({"a": torch.ones(2), 3: (1.5, "x")}, "s", t)
        >>> list(t), unflatten_state(tree, t)[3]
        (['s.a'], (1.5, 'x'))
    """
    if isinstance(obj, torch.Tensor):
        key, n = prefix, 1
        while key in tensors:  # e.g. {"a.b": t, "a": {"b": t}} both map to "s.a.b"
            n += 1
            key = f"{prefix}#{n}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(
        f"expected tensors, numbers, strings, lists or dicts in state {prefix!r}, got {type(obj).__name__}"
    )


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"].items()}
        if "__items__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        raise CheckpointError(f"expected a known state node, got keys {sorted(tree)}")
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def save_checkpoint(
    directory: str | Path, epoch: int, state: dict[str, Any], info: dict[str, Any], *, stem: str | None = None
) -> Path:
    """Write checkpoint ``epoch`` (tensor file, then sidecar) into ``directory``.

    The sidecar's ``sha256`` covers the tensor file and the sidecar itself (see the module docstring).

    Args:
        directory: where checkpoints live.
        epoch: the number of completed epochs.
        state: nested state (``{"model": state_dict, "optimizer": ..., ...}``).
        info: JSON-able facts shown to people (history, policy hash, ...).
        stem: the files' name without suffix; None: ``epoch-NNNN`` (:data:`BEST_STEM` for the
            best epoch's weights).

    Returns:
        The sidecar's path.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> save_checkpoint(d, 2, {"model": {"w": torch.ones(2)}}, {}, stem=BEST_STEM).name
        'best.json'
        >>> load_checkpoint(d / "best.json")[0], list_checkpoints(d)
        (2, [])
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten_state(state, "s", tensors)
    blob = st_save(tensors)
    stem = f"epoch-{epoch:04d}" if stem is None else stem
    atomic_write(directory / f"{stem}.safetensors", blob)
    sidecar = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        "file": f"{stem}.safetensors",
        "size": len(blob),
        "state": tree,
        "info": info,
    }
    path = directory / f"{stem}.json"
    try:
        body = json.loads(json.dumps(sidecar))  # the digest covers what a reader will parse
        atomic_write(path, json.dumps({**body, "sha256": _digest(blob, body)}, indent=1).encode())
    except BaseException:  # a tensor file without its sidecar is never loaded: do not leave it behind
        (directory / f"{stem}.safetensors").unlink(missing_ok=True)
        raise
    return path


def _canonical(meta: dict[str, Any]) -> bytes:
    """The sidecar as canonical JSON (sorted keys, compact), without its ``sha256``."""
    return json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True, separators=(",", ":")).encode()


def _digest(blob: bytes, meta: dict[str, Any]) -> str:
    """SHA-256 of the tensor file's bytes followed by the sidecar's canonical JSON."""
    h = hashlib.sha256(blob)
    h.update(_canonical(meta))
    return h.hexdigest()


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Sidecars in ``directory``, oldest epoch first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(sidecar: str | Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Read and verify one checkpoint; returns ``(epoch, state, info)``.

    Raises:
        CheckpointError: a file is missing, truncated, or fails its SHA-256 (which covers the
            tensor file and the sidecar: any edit of either).
    """
    sidecar = Path(sidecar)
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        name = meta["file"]
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"file {name!r} is not a plain file name next to the sidecar")
        blob = (sidecar.parent / name).read_bytes()
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"expected a readable checkpoint at {str(sidecar)!r}, got {exc}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"expected checkpoint format {FORMAT_VERSION} in {str(sidecar)!r}, got {meta.get('format')!r}"
        )
    try:
        digest = _digest(blob, meta)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"expected a readable checkpoint at {str(sidecar)!r}, got {exc}") from None
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"expected SHA-256 {str(meta.get('sha256'))[:64]} for {name!r} and {sidecar.name!r}, got {digest} "
            "(truncated or modified)"
        )
    try:
        tensors = st_load(blob)
    except Exception as exc:
        raise CheckpointError(f"expected a valid safetensors file {meta['file']!r}, got {exc}") from None
    try:  # hashed, yet written by a possibly buggy writer: a damaged tree is a CheckpointError too
        info = meta.get("info", {})
        if not isinstance(info, dict):
            raise TypeError(f"info is a {type(info).__name__}, not an object")
        return int(meta["epoch"]), unflatten_state(meta["state"], tensors), info
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"expected a valid state tree in {str(sidecar)!r}, got {what}") from None


def load_latest(directory: str | Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that passes its hash check, warning about each one skipped.

    Returns None when there is no intact checkpoint (or no directory).
    """
    found = list_checkpoints(directory)
    for i, sidecar in reversed(list(enumerate(found))):
        try:
            return load_checkpoint(sidecar)
        except CheckpointError as exc:
            then = f"trying {found[i - 1].name}" if i else "no older checkpoint left"
            warnings.warn(f"skipping checkpoint {sidecar.name}: {exc}; {then}", RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep=0`` deletes them all).

    Also deletes the temp files of checkpoint writes that a killed process left behind
    (``.epoch-NNNN.safetensors.*.tmp``): call it only when no checkpoint write is under way in
    ``directory`` (harden calls it right after writing one, from the one process that writes).
    """
    directory = Path(directory)
    found = list_checkpoints(directory)
    for sidecar in found[: max(0, len(found) - keep)]:
        stem = sidecar.with_suffix("")
        sidecar.unlink(missing_ok=True)
        stem.with_suffix(".safetensors").unlink(missing_ok=True)
    if directory.is_dir():
        for stale in directory.iterdir():
            if CHECKPOINT_TEMP.match(stale.name):
                stale.unlink(missing_ok=True)
