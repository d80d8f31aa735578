"""A fit's checkpointed state: what an epoch checkpoint holds, and resuming from the newest one.

A checkpoint keeps the model, optimizer, scheduler, objectives' state (with their step count),
the RNG states and the fp16 gradient scaler, so a resumed run continues exactly as an
uninterrupted one would. Its ``info`` names the run (``run_id`` of the run folder), the full policy
hash (``policy_sha256``) and the :func:`resume_hash`; a resume refuses a checkpoint of another run
or of another policy (``train.epochs`` aside). Files are written atomically, and hashed together
with their sidecar, by :mod:`harden.checkpoint`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from harden.checkpoint import load_latest, prune_checkpoints, save_checkpoint
from harden.errors import CheckpointError, HardenError
from harden.policy import Policy
from harden.policy_io import policy_hash

if TYPE_CHECKING:
    from harden.fit_setup import FitRun

__all__ = ["resume_hash", "resume_run", "save_epoch_checkpoint"]

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
    _load_state(run, epoch, state)
    torch.set_rng_state(state["rng"]["torch"])
    device = run.dist.device
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    run.history = list(info.get("history", []))
    run.start_epoch = run.resumed_from = epoch
    log.info("resumed from epoch %d", epoch)
    return epoch


def _load_state(run: FitRun, epoch: int, state: dict[str, Any]) -> None:
    """Load a checkpoint's model, objectives, optimizer, scheduler and scaler state into ``run``."""
    try:
        run.net.load_state_dict(state["model"])
        run.mix.load_state_dict(state.get("objectives", {}))
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler.is_enabled() and "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        # torch's message starts with a header line ("Error(s) in loading ..."): name the first mismatch
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        first = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]).rstrip(".")
        raise CheckpointError(
            f"expected the checkpoint of epoch {epoch} in {run.ckpt_dir} to fit this policy's model, "
            f"objectives and optimizer, got: {first[:300]}; resume only with the policy that wrote it, "
            "or train into a new --out"
        ) from None
