"""A fit's checkpointed state: what an epoch checkpoint holds, and resuming from the newest one.

A checkpoint keeps the model, optimizer, scheduler, objectives' state (with their step count),
the RNG states and the fp16 gradient scaler, so a resumed run continues exactly as an
uninterrupted one would. Its ``info`` names the run (``run_id`` of the run folder), the full policy
hash (``policy_sha256``) and the :func:`resume_hash`; a resume refuses a checkpoint of another run
or of another policy (``train.epochs`` aside). Files are written atomically, and hashed together
with their sidecar, by :mod:`harden.checkpoint`.

The best epoch by the probe's robust accuracy (``val_pgd_acc``; a tie is no improvement) is
``checkpoints/best.safetensors`` / ``best.json`` (``train.keep_best``), a checkpoint of the
same format holding the model alone, never pruned. The history decides which epoch is best: a
resume takes the best-so-far from the restored history (:func:`sync_best`), so it never
overwrites a better best, and a best file that is not that epoch's (from epochs the resume
trains again, damaged, of another run) is removed. A checkpoint records ``stopped_early``: a
resumed run that early stopping ended trains no further.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch

from harden.checkpoint import BEST_STEM, load_checkpoint, load_latest, prune_checkpoints, save_checkpoint
from harden.errors import CheckpointError, HardenError
from harden.fit_setup import history_best
from harden.policy import Policy
from harden.policy_io import policy_hash

if TYPE_CHECKING:
    from harden.fit_setup import FitRun

__all__ = [
    "best_weights",
    "resume_hash",
    "resume_run",
    "save_best",
    "save_epoch_checkpoint",
    "sync_best",
]

log = logging.getLogger("harden")


def resume_hash(policy: Policy) -> str:
    """The policy's hash with ``train.epochs`` left out: resuming to train longer is not a policy change.

    Example:
        >>> from harden.testing import tiny_policy
        >>> resume_hash(tiny_policy(train={"epochs": 1})) == resume_hash(tiny_policy(train={"epochs": 5}))
        True
    """
    return policy_hash(policy.model_copy(update={"train": policy.train.model_copy(update={"epochs": 1})}))


def save_epoch_checkpoint(run: FitRun, epoch: int, p_hash: str) -> None:
    """Write the checkpoint of epoch ``epoch`` (1-based) into ``run.ckpt_dir`` and prune old ones.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from harden.distributed import Distributed
        >>> from harden.fit_setup import set_up
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> b, out = synthetic_bundle(), Path(tempfile.mkdtemp())
        >>> run = set_up(None, tiny_policy(), Distributed(torch.device("cpu")), b.train, b.test, b, out)
        >>> save_epoch_checkpoint(run, 1, "hash")
        >>> sorted(p.name for p in run.ckpt_dir.iterdir())
        ['epoch-0001.json', 'epoch-0001.safetensors']
    """
    device = run.dist.device
    state = {
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "objectives": run.mix.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
        },
        **({"scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {}),
    }
    info = {
        "history": run.history,
        "run_id": run.run_id,
        "policy_sha256": p_hash,
        "resume_hash": resume_hash(run.policy),
        "best_epoch": run.best_epoch,
        "stopped_early": run.stopped_early,
    }
    save_checkpoint(run.ckpt_dir, epoch, state, info)
    prune_checkpoints(run.ckpt_dir, run.policy.train.keep_checkpoints)


def resume_run(run: FitRun) -> None:
    """Restore the newest intact checkpoint of ``run.ckpt_dir`` into ``run`` (none: start from scratch).

    Sets ``run.start_epoch``, ``run.history`` and ``run.resumed_from`` and restores the model,
    optimizer, scheduler, objectives, scaler and RNG states. Under ``torchrun`` every rank must
    find the same checkpoint; an error on one rank is raised on every rank (none waits forever).

    Raises:
        CheckpointError: the checkpoint belongs to another run (its ``run_id`` is not
            ``run.run_id``), was written under another policy (:func:`resume_hash`), or does not
            fit the run's model, objectives or optimizer.
        HardenError: the ranks resumed from different epochs.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from harden.distributed import Distributed
        >>> from harden.fit_setup import set_up
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> b, out, dist = synthetic_bundle(), Path(tempfile.mkdtemp()), Distributed(torch.device("cpu"))
        >>> save_epoch_checkpoint(set_up(None, tiny_policy(), dist, b.train, b.test, b, out), 1, "hash")
        >>> run = set_up(None, tiny_policy(), dist, b.train, b.test, b, out)
        >>> resume_run(run)
        >>> run.start_epoch, run.resumed_from
        (1, 1)
    """
    found = load_latest(run.ckpt_dir)
    start_epoch, error = 0, None
    if found is None:
        log.warning("resume requested but no intact checkpoint in %s; starting from scratch", run.ckpt_dir)
    else:
        try:
            start_epoch = _restore(run, *found)
        except HardenError as exc:
            start_epoch, error = 0, exc
    dist = run.dist
    if not dist.enabled:
        if error is not None:
            raise error
        return
    failed, total = dist.all_sum([float(error is not None), float(start_epoch)])
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"expected every rank to resume from {str(run.ckpt_dir)!r}, got a failure on another rank (see its message)"
        )
    if total != start_epoch * dist.world_size:
        raise HardenError(
            f"expected every rank to resume from the same checkpoint, got epoch {start_epoch} on rank {dist.rank} "
            f"and others elsewhere; put {str(run.run_dir)!r} on a filesystem every node shares"
        )


def _restore(run: FitRun, epoch: int, state: dict[str, Any], info: dict[str, Any]) -> int:
    """Check that a verified checkpoint is this run's, under this policy, and load it into ``run``."""
    where = f"the checkpoint of epoch {epoch} in {str(run.ckpt_dir)!r}"
    stored_id = info.get("run_id")
    if stored_id != run.run_id:
        raise CheckpointError(
            f"expected {where} to belong to this folder's run {run.run_id or '(none)'}, got run "
            f"{str(stored_id)[:40]!r}: start over with --overwrite, or use another --out"
        )
    stored, now = info.get("resume_hash"), resume_hash(run.policy)
    if stored != now:
        raise CheckpointError(
            f"expected {where} to be written under this policy (train.epochs aside; resume hash {now[:12]}...), "
            f"got resume hash {str(stored)[:12]}...: resume with the policy that wrote it (the folder's "
            "policy.yaml), or start over with --overwrite"
        )
    history = info.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(
            f"expected {where} to hold a history of epoch records, got {type(history).__name__}: start over "
            "with --overwrite, or delete that checkpoint to resume from an older one"
        )
    _load_state(run, epoch, state)
    run.history = list(history)
    run.start_epoch = run.resumed_from = epoch
    run.stopped_early = info.get("stopped_early") is True
    log.info("resumed from epoch %d%s", epoch, " (early stopping had ended the training)" * run.stopped_early)
    return epoch


def save_best(run: FitRun, epoch: int, p_hash: str) -> None:
    """Write the model as ``checkpoints/best.safetensors`` / ``best.json``: epoch ``epoch``, ``run.best_value``."""
    info = {
        "run_id": run.run_id,
        "policy_sha256": p_hash,
        "resume_hash": resume_hash(run.policy),
        "val_pgd_acc": run.best_value,
    }
    save_checkpoint(run.ckpt_dir, epoch, {"model": run.net.state_dict()}, info, stem=BEST_STEM)


def _read_best(run: FitRun) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """The verified best checkpoint of this run (None: none, not a regular file, damaged, another run's)."""
    sidecar = run.ckpt_dir / f"{BEST_STEM}.json"
    if sidecar.is_symlink() or not sidecar.is_file():
        return None
    try:
        epoch, state, info = load_checkpoint(sidecar)
    except CheckpointError:
        return None
    if info.get("run_id") != run.run_id or info.get("resume_hash") != resume_hash(run.policy):
        return None
    return epoch, state, info


def _remove_best(run: FitRun) -> None:
    for suffix in (".json", ".safetensors"):  # the sidecar first: a tensor file alone is never read
        path = run.ckpt_dir / f"{BEST_STEM}{suffix}"
        if os.path.lexists(path) and not path.is_dir():
            path.unlink()


def sync_best(run: FitRun, p_hash: str) -> None:
    """Set the best-so-far from ``run.history`` and make the best checkpoint match it (rank 0 writes).

    After a resume (or at a fresh start, with an empty history): ``run.best_epoch`` and
    ``run.best_value`` come from :func:`history_best`. With ``train.keep_best``, a best file of
    that epoch and value is kept; when the restored model is the best epoch's, the file is
    written from it; any other best file is removed (one from epochs the resumed run trains
    again silently, a missing or damaged one with a warning: ``select: best`` then returns the
    last epoch unless a later epoch improves).
    """
    run.best_epoch, run.best_value = history_best(run.history)
    if not run.policy.train.keep_best or not run.dist.is_main:
        return
    found = _read_best(run)
    if run.best_epoch is not None:
        if found is not None and found[0] == run.best_epoch and found[2].get("val_pgd_acc") == run.best_value:
            return
        if run.best_epoch == run.start_epoch:  # the restored model is the best epoch's
            save_best(run, run.best_epoch, p_hash)
            return
        if found is None or found[0] <= run.start_epoch:
            warnings.warn(
                f"the best checkpoint of epoch {run.best_epoch} in {str(run.ckpt_dir)!r} is missing or damaged; "
                "the best is tracked from here (select: best returns the last epoch unless one improves)",
                RuntimeWarning,
                stacklevel=2,
            )
    _remove_best(run)


def best_weights(run: FitRun) -> dict[str, torch.Tensor] | None:
    """The weights of ``run.best_epoch``: ``run.best_state``, else the best checkpoint's (None: not kept)."""
    if run.best_epoch is None:
        return None
    if run.best_state is not None:
        return run.best_state
    found = _read_best(run)
    if found is None or found[0] != run.best_epoch or not isinstance(found[1], dict):
        return None
    model = found[1].get("model")
    return model if isinstance(model, dict) else None


def _load_state(run: FitRun, epoch: int, state: dict[str, Any]) -> None:
    """Load a checkpoint's model, objectives, optimizer, scheduler, scaler and RNG state into ``run``.

    The optimizer, scheduler, scaler and RNG state are checked against the live objects first
    (:func:`_check_resumable`): ``LambdaLR.load_state_dict`` sets any attribute a state names.
    """
    try:
        if not isinstance(state, dict):
            raise TypeError(f"a state of type {type(state).__name__}, not a mapping")
        run.net.load_state_dict(state["model"])
        run.mix.load_state_dict(state.get("objectives", {}))
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        # torch's message starts with a header line ("Error(s) in loading ..."): name the first mismatch
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        first = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]).rstrip(".")
        raise CheckpointError(
            f"expected the checkpoint of epoch {epoch} in {run.ckpt_dir} to fit this policy's model, "
            f"objectives and optimizer, got: {first[:300]}; resume only with the policy that wrote it, "
            "or train into a new --out"
        ) from None
    sidecar = run.ckpt_dir / f"epoch-{epoch:04d}.json"
    try:
        _check_resumable(run, state)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler.is_enabled() and "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        device = run.dist.device
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError) as exc:
        what = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()[:300]
        raise CheckpointError(
            f"expected the checkpoint {str(sidecar)!r} to hold this run's optimizer, scheduler, scaler and RNG "
            f"state, got {what}; resume cannot continue from it: start over with --overwrite, or delete "
            f"{sidecar.name} and {sidecar.with_suffix('.safetensors').name} to resume from an older checkpoint"
        ) from None


def _check_resumable(run: FitRun, state: dict[str, Any]) -> None:
    """Raise ValueError unless the stored optimizer, scheduler, scaler and RNG state fit the live ones."""
    for key in ("optimizer", "scheduler", "rng"):
        if key not in state:
            raise ValueError(f"no {key} state")
    _check_optimizer(run.optimizer, state["optimizer"])
    live_sched = run.scheduler.state_dict()
    _same_layout(live_sched, state["scheduler"], "scheduler")
    if state["scheduler"]["base_lrs"] != live_sched["base_lrs"]:  # the policy's lr (one per group)
        raise ValueError(f"scheduler base_lrs {str(state['scheduler']['base_lrs'])[:60]}, not the policy's")
    if run.scaler.is_enabled() and "scaler" in state:
        _same_layout(run.scaler.state_dict(), state["scaler"], "scaler")
    rng = state["rng"]
    if not isinstance(rng, dict):
        raise ValueError("rng state is not a mapping")
    _check_rng(torch.get_rng_state(), rng.get("torch"), "rng.torch")
    device = run.dist.device
    if device.type == "cuda" and "cuda" in rng:
        _check_rng(torch.cuda.get_rng_state(device), rng["cuda"], "rng.cuda")


def _check_rng(live: torch.Tensor, stored: Any, where: str) -> None:
    if not isinstance(stored, torch.Tensor) or stored.dtype != live.dtype or stored.shape != live.shape:
        got = tuple(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
        raise ValueError(f"{where}: a {live.dtype} tensor of shape {tuple(live.shape)} expected, got {got}")


def _same_layout(live: Any, stored: Any, where: str) -> None:
    """Raise ValueError unless ``stored`` has ``live``'s keys, types and lengths (numbers stay finite numbers)."""
    if live is None or isinstance(live, (bool, str)):
        ok = stored is None if live is None else type(stored) is type(live)
    elif isinstance(live, (int, float)):
        ok = (
            isinstance(stored, (int, float))
            and not isinstance(stored, bool)
            and (isinstance(live, float) or isinstance(stored, int))
            and math.isfinite(stored)
        )
    elif isinstance(live, torch.Tensor):
        ok = isinstance(stored, torch.Tensor) and stored.shape == live.shape and stored.dtype == live.dtype
    elif isinstance(live, (list, tuple)):
        if not isinstance(stored, (list, tuple)) or len(stored) != len(live):
            raise ValueError(f"{where}: {len(live)} items expected, got {_kind(stored)}")
        for i, (a, b) in enumerate(zip(live, stored, strict=True)):
            _same_layout(a, b, f"{where}[{i}]")
        return
    elif isinstance(live, dict):
        if not isinstance(stored, dict):
            raise ValueError(f"{where}: a mapping expected, got {_kind(stored)}")
        if set(stored) != set(live):
            extra, missing = (
                sorted(map(str, a - b))[:5] for a, b in ((set(stored), set(live)), (set(live), set(stored)))
            )
            raise ValueError(f"{where}: unknown keys {extra}, missing keys {missing}"[:300])
        for k, v in live.items():
            _same_layout(v, stored[k], f"{where}.{k}")
        return
    else:  # pragma: no cover - torch's state holds only the types above
        ok = False
    if not ok:
        raise ValueError(f"{where}: a {type(live).__name__} expected, got {_kind(stored)}")


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"keys {sorted(map(str, value))}" if len(value) <= 12 else f"a mapping of {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} items"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _check_optimizer(optimizer: torch.optim.Optimizer, stored: Any) -> None:
    """Raise ValueError unless ``stored`` is a state of ``optimizer``: its groups, hyperparameters and shapes."""
    live = optimizer.state_dict()
    if not isinstance(stored, dict) or set(stored) != {"state", "param_groups"}:
        raise ValueError(f"optimizer: keys ['param_groups', 'state'] expected, got {_kind(stored)}")
    groups = stored["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live["param_groups"]):
        raise ValueError(f"optimizer: {len(live['param_groups'])} param groups expected, got {_kind(groups)}")
    for i, (mine, theirs) in enumerate(zip(live["param_groups"], groups, strict=True)):
        where = f"optimizer.param_groups[{i}]"
        _same_layout(mine, theirs, where)
        changed = sorted(k for k in mine if k != "lr" and theirs[k] != mine[k])  # lr: the schedule moves it
        if changed:
            raise ValueError(f"{where}: {', '.join(changed)[:100]} differ from this policy's")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param = stored["state"]
    if not isinstance(per_param, dict):
        raise ValueError(f"optimizer.state: a mapping expected, got {_kind(per_param)}")
    for index, entry in per_param.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"optimizer.state: parameter index {str(index)[:20]!r} out of range")
        if not isinstance(entry, dict):
            raise ValueError(f"optimizer.state[{index}]: a mapping expected, got {_kind(entry)}")
        shape = params[index].shape
        for name, value in entry.items():
            if not isinstance(name, str):
                raise ValueError(f"optimizer.state[{index}]: key {str(name)[:20]!r} is not a name")
            if isinstance(value, torch.Tensor):
                if not value.is_floating_point() or value.shape not in (shape, torch.Size([])):
                    raise ValueError(
                        f"optimizer.state[{index}].{name}: a float tensor of shape {tuple(shape)} expected, "
                        f"got {value.dtype} of shape {tuple(value.shape)}"
                    )
            elif value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"optimizer.state[{index}].{name}: a tensor expected, got {_kind(value)}")
