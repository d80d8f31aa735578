"""The epoch loop of one :func:`harden.fit`: train every batch, then probe and checkpoint.

:func:`harden.fit` resolves the data, runs :func:`harden.fit_setup.set_up`, optionally
:func:`harden.fit_state.resume_run`, and per epoch :func:`train_epoch` followed by
:func:`end_epoch` (probe, history, checkpoint). Both read and update one
:class:`harden.fit_setup.FitRun`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harden.batches import unwrap_worker_errors
from harden.data import check_batch, to_device
from harden.distributed import Distributed
from harden.errors import HardenError
from harden.fit_setup import FitRun, TrainData, epoch_loader
from harden.fit_state import save_epoch_checkpoint
from harden.models import Normalized
from harden.policy import Policy

__all__ = ["MAX_BAD_STEPS", "end_epoch", "train_epoch"]

log = logging.getLogger("harden")

#: Consecutive non-finite losses after which training aborts.
MAX_BAD_STEPS = 10


def _device_batches(run: FitRun, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``epoch``'s batches, checked, on the run's device, in the training memory format."""
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]] = epoch_loader(run.train, run.policy, epoch, run.dist)
    for xb, yb in unwrap_worker_errors(loader):  # a worker's one-line DataError stays one line
        check_batch(xb, yb, run.num_classes, run.in_chans)
        x, y = to_device(xb, yb, run.dist.device)
        if run.policy.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def train_epoch(run: FitRun, epoch: int) -> dict[str, Any]:
    """Train epoch ``epoch`` (0-based) on every batch; returns its record without the probe.

    The record has ``epoch`` (1-based), ``lr``, ``train_loss``, each objective's weighted loss
    when mixed, and ``skipped_steps`` (non-finite losses, left out of the step); sums are over
    every rank.

    Raises:
        HardenError: :data:`MAX_BAD_STEPS` non-finite losses in a row (naming the objectives).

    Example:
        >>> from pathlib import Path
        >>> from harden.distributed import Distributed
        >>> from harden.fit_setup import set_up
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> b = synthetic_bundle(96, 32)
        >>> policy = tiny_policy(objectives=[{"name": "ce"}])
        >>> run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, b.test, b, Path("/tmp/h"))
        >>> record = train_epoch(run, 0)
        >>> record["epoch"], record["skipped_steps"], record["train_loss"] > 0
        (1, 0, True)
    """
    dist, spec = run.dist, run.policy.train
    if dist.enabled:  # each rank its own attack noise, replayable on resume
        torch.manual_seed(dist.epoch_seed(run.policy.seed, epoch))
    run.net.train()

    def batches(epoch: int = epoch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _device_batches(run, epoch)

    run.mix.begin_epoch(epoch, batches, run.progress)  # e.g. MI's estimators warm up on the frozen model
    names = run.loss_names
    total, count, skipped = 0.0, 0, 0
    part_sums = dict.fromkeys(names, 0.0)  # weighted loss of each objective (when mixed)
    desc = f"epoch {epoch + 1}/{spec.epochs}"
    bar = tqdm(batches(), total=run.steps_per_epoch, desc=desc, disable=not run.progress, leave=False)
    for step, (x, y) in enumerate(bar):
        ctx = run.mix.context(x, y, run.policy.threat)
        loss, part_losses = run.mix.loss(ctx)
        if not _finite_or_skip(run, loss, part_losses, epoch, step):
            skipped += 1
            continue
        _step(loss, run.net, run.optimizer, run.scaler, spec.grad_clip)
        run.scheduler.step()
        run.mix.after_step(ctx)
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
        for key, part in zip(names, part_losses, strict=False):
            part_sums[key] += float(part.detach()) * x.shape[0]
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    bar.close()
    dist.average_buffers(run.net)  # BatchNorm statistics: the same model on every rank
    loss_sum, n_seen, *sums = dist.all_sum([total, count, *part_sums.values()])  # over ranks
    return {
        "epoch": epoch + 1,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / max(n_seen, 1),
        **{k: v / max(n_seen, 1) for k, v in zip(names, sums, strict=True)},
        "skipped_steps": skipped,
    }


def _finite_or_skip(run: FitRun, loss: torch.Tensor, part_losses: list[torch.Tensor], epoch: int, step: int) -> bool:
    """Whether the step goes ahead; a non-finite loss clears the gradients and counts toward the abort."""
    finite = bool(torch.isfinite(loss))
    if run.dist.enabled:  # every rank skips together, or the gradient all-reduce would hang
        finite = not run.dist.any(not finite)
    if finite:
        run.bad_run = 0
        return True
    run.bad_run += 1
    run.optimizer.zero_grad(set_to_none=True)
    if run.bad_run >= MAX_BAD_STEPS:
        parts = zip(run.objectives, part_losses, strict=True)
        bad = [o.name for (_, o), p in parts if not torch.isfinite(p)]
        raise HardenError(
            f"expected finite losses, got {run.bad_run} non-finite in a row (epoch {epoch + 1}, batch {step}, "
            f"objectives {bad}); lower train.lr or check the data"
        )
    return False


def _step(
    loss: torch.Tensor,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> None:
    """Backward (scaled for fp16), optional clipping of the true gradients, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def end_epoch(
    run: FitRun,
    record: dict[str, Any],
    started: float,
    policy_hash: str,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Finish an epoch's record (probe, ``seconds``), append it, and checkpoint when due.

    Args:
        run: the run.
        record: :func:`train_epoch`'s record; completed in place.
        started: ``time.perf_counter()`` when the epoch started.
        policy_hash: the policy's hash, kept in the checkpoint.
        on_epoch_end: called with the finished record.

    Example:
        >>> import tempfile, time
        >>> from pathlib import Path
        >>> from harden.distributed import Distributed
        >>> from harden.fit_setup import set_up
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> b, out = synthetic_bundle(96, 32), Path(tempfile.mkdtemp())
        >>> policy = tiny_policy(objectives=[{"name": "ce"}])
        >>> run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, b.test, b, out)
        >>> end_epoch(run, train_epoch(run, 0), time.perf_counter(), "hash")
        >>> sorted(run.history[0]), [p.name for p in sorted(run.ckpt_dir.iterdir())]
        (['epoch', 'lr', 'seconds', 'skipped_steps', 'train_loss', 'val_clean_acc', 'val_pgd_acc'], \
['epoch-0001.json', 'epoch-0001.safetensors'])
    """
    if run.val is not None:
        record.update(_evaluate(run.net, run.val, run.policy, run.dist))
    record["seconds"] = time.perf_counter() - started
    run.history.append(record)
    log.info("epoch %d: %s", record["epoch"], record)
    if on_epoch_end is not None:
        on_epoch_end(record)
    spec, epoch = run.policy.train, record["epoch"]
    if run.dist.is_main and (epoch == spec.epochs or epoch % spec.checkpoint_every == 0):
        save_epoch_checkpoint(run, epoch, policy_hash)
    run.dist.barrier()  # the others wait for rank 0's files


def _evaluate(model: Normalized, data: TrainData, policy: Policy, dist: Distributed) -> dict[str, float]:
    """Clean accuracy and the PGD probe; under torchrun each rank takes its shard and counts are summed."""
    from harden.probe import clean_and_pgd_counts

    probe = policy.train.probe_examples
    if dist.enabled:  # shard the dataset (a DataLoader's own batching is not needed to count)
        dataset = data.dataset if isinstance(data, DataLoader) else data
        probe = dist.share(probe, len(dataset))  # type: ignore[arg-type]
        data = dist.shard(dataset)
    counts = clean_and_pgd_counts(
        model,
        data,
        policy.threat,
        dist.device,
        batch_size=policy.data.eval_batch_size,
        probe_examples=probe,
        probe_steps=policy.train.probe_steps,
        seed=policy.seed,
    )
    right, total, adv_right, adv_total = dist.all_sum(counts)
    out = {"val_clean_acc": right / max(total, 1)}
    if adv_total:
        out["val_pgd_acc"] = adv_right / adv_total
    return out
