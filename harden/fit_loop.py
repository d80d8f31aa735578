"""The epoch loop of one :func:`harden.fit`: train every batch, then probe and checkpoint.

:func:`harden.fit` resolves the data, runs :func:`harden.fit_setup.set_up`, optionally
:func:`harden.fit_state.resume_run`, and per epoch :func:`train_epoch` followed by
:func:`end_epoch` (probe, history, the epoch's line, metrics, best epoch, early stopping,
checkpoint). Both read and update one :class:`harden.fit_setup.FitRun`. Training batches are
augmented (:mod:`harden.augment`) when ``data.augment`` says so, with a generator seeded by the
policy's seed and the epoch; the probe never sees augmented images.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harden.augment import augment_batch
from harden.batches import unwrap_worker_errors
from harden.data import check_batch, to_device
from harden.errors import DataError, HardenError, ModelError
from harden.fit_setup import FitRun, epoch_loader
from harden.fit_state import best_weights, save_best, save_epoch_checkpoint
from harden.probe import clean_and_pgd_counts, probe_indices

__all__ = ["MAX_BAD_STEPS", "end_epoch", "epoch_line", "select_weights", "train_epoch"]

log = logging.getLogger("harden")

#: Consecutive non-finite losses after which training aborts.
MAX_BAD_STEPS = 10


def _device_batches(run: FitRun, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``epoch``'s batches, checked, on the run's device, in the training memory format."""
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]] = epoch_loader(run.train, run.policy, epoch, run.dist)
    # its own stream (not the global RNG's attack noise), the same on a resume; one per rank
    gen = torch.Generator().manual_seed(run.dist.epoch_seed(run.policy.seed + 1, epoch)) if run.augment else None
    for xb, yb in unwrap_worker_errors(loader):  # a worker's one-line DataError stays one line
        try:
            check_batch(xb, yb, run.num_classes, run.in_chans)
        except DataError as exc:
            if run.in_chans is None and "expected labels in" in str(exc):  # user data: the classes are the logits
                raise ModelError(
                    f"expected the model to output a logit per class, got {run.num_classes} logits and labels "
                    f"beyond them ({exc}): set model.num_classes / the classifier size to the data's classes"
                ) from None
            raise
        x, y = to_device(xb, yb, run.dist.device)
        if gen is not None:
            x = augment_batch(x, gen)
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
    """Finish an epoch's record (probe, ``seconds``), append it, report it, and checkpoint when due.

    The record goes to the log, to ``run.metrics`` and, with progress on, to the epoch's line
    (:func:`epoch_line`). A probe robust accuracy above the best so far makes it the best epoch
    (``checkpoints/best.safetensors`` with ``train.keep_best``); ``train.early_stopping``
    epochs without one stop the training (``run.stopped_early``; that epoch is checkpointed).

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
        >>> sorted(run.history[0]), run.best_epoch, [p.name for p in sorted(run.ckpt_dir.iterdir())]
        (['epoch', 'lr', 'seconds', 'skipped_steps', 'train_loss', 'val_clean_acc', 'val_pgd_acc'], 1, \
['best.json', 'best.safetensors', 'epoch-0001.json', 'epoch-0001.safetensors'])
    """
    if run.val is not None:
        record.update(_evaluate(run))
    record["seconds"] = time.perf_counter() - started
    run.history.append(record)
    spec, epoch = run.policy.train, record["epoch"]
    best = run.track_best(record)
    patience = spec.early_stopping
    run.stopped_early = bool(
        patience and run.best_epoch is not None and epoch - run.best_epoch >= patience and epoch < spec.epochs
    )
    log.info("epoch %d: %s", epoch, record)
    _report(run, epoch_line(record, spec.epochs, spec.probe_steps, best))
    if run.stopped_early:
        stop = (
            f"early stopping: no better probe robust accuracy in the {patience} epochs since epoch {run.best_epoch} "
            f"({run.best_value:.1%}); training ends after epoch {epoch} of {spec.epochs}"
        )
        log.info("%s", stop)
        _report(run, stop)
    if on_epoch_end is not None:
        on_epoch_end(record)
    if run.dist.is_main:
        if epoch == spec.epochs or epoch % spec.checkpoint_every == 0 or run.stopped_early:
            save_epoch_checkpoint(run, epoch, policy_hash)
        if best and spec.keep_best:  # after the epoch's checkpoint: a resume between the two rewrites it
            save_best(run, epoch, policy_hash)
    if run.metrics is not None:  # after the checkpoint: a failed first epoch leaves no metrics
        run.metrics.log(record)
    run.dist.barrier()  # the others wait for rank 0's files


def select_weights(run: FitRun) -> int | None:
    """Load the weights ``train.select`` names into ``run.net``; returns their epoch (None: no epoch).

    ``last``: the model as trained. ``best``: the best epoch's weights (:func:`harden.fit_state.best_weights`),
    or, with a warning, the last epoch's when they were not kept (a resume that lost them).
    """
    last = run.history[-1]["epoch"] if run.history else None
    if run.policy.train.select == "best" and run.best_epoch is None and last is not None:
        warnings.warn(
            "expected a probe robust accuracy for train.select: best, got none (no validation data); "
            f"the model is the last epoch's ({last})",
            RuntimeWarning,
            stacklevel=4,
        )
    if run.policy.train.select != "best" or run.best_epoch is None or run.best_epoch == last:
        return last
    state = best_weights(run)
    if state is None:
        warnings.warn(
            f"expected the weights of the best epoch {run.best_epoch} for train.select: best, got none kept "
            f"(see the warning on resume); {str(run.run_dir / 'model.safetensors')!r} holds epoch {last}'s",
            RuntimeWarning,
            stacklevel=4,
        )
        return last
    run.net.load_state_dict(state)
    return run.best_epoch


def _report(run: FitRun, line: str) -> None:
    """Print a line when the run shows progress (rank 0 only), above any progress bar."""
    if run.progress:
        tqdm.write(line)


def epoch_line(record: dict[str, Any], epochs: int, probe_steps: int, best: bool = False) -> str:
    """The one line an epoch prints: loss, validation clean and probe accuracy, best mark, time.

    Example:
        >>> r = {"epoch": 3, "train_loss": 0.4123, "val_clean_acc": 0.971, "val_pgd_acc": 0.512, "seconds": 12.41}
        >>> epoch_line(r, 5, 10, best=True)
        'epoch 3/5  loss 0.412  val clean 97.1%  PGD-10 51.2%  (best)  12.4 s'
    """
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record.get('train_loss', float('nan')):.3f}"]
    if "train_acc" in record:
        parts.append(f"train acc {record['train_acc']:.1%}")
    if "val_clean_acc" in record:
        parts.append(f"val clean {record['val_clean_acc']:.1%}")
    if "val_pgd_acc" in record:
        parts.append(f"PGD-{probe_steps} {record['val_pgd_acc']:.1%}")
    if best:
        parts.append("(best)")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} non-finite steps skipped")
    parts.append(f"{record.get('seconds', 0.0):.1f} s")
    return "  ".join(parts)


def _probe_sample(run: FitRun, dataset: Any) -> torch.Tensor | None:
    """The probe's sample of the validation data (drawn once, then the same every epoch)."""
    if not run.probe_sampled:  # seed + 1: a draw of its own, not nested in verify's sample of the same split
        run.probe_sample = probe_indices(dataset, run.policy.train.probe_examples, run.policy.seed + 1)
        run.probe_sampled = True
    return run.probe_sample


def _evaluate(run: FitRun) -> dict[str, float]:
    """Clean accuracy and the PGD probe; under torchrun each rank takes its shard and counts are summed."""
    policy, dist, data = run.policy, run.dist, run.val
    if data is None:
        return {}
    probe = policy.train.probe_examples
    if dist.enabled:  # shard the dataset (a DataLoader's own batching is not needed to count)
        dataset = data.dataset if isinstance(data, DataLoader) else data
        sample = _probe_sample(run, dataset)
        if sample is not None:  # the global sample's positions in this rank's strided shard
            mine = sample[sample % dist.world_size == dist.rank]
            sample = (mine - dist.rank) // dist.world_size
        probe = dist.share(probe, len(dataset))  # type: ignore[arg-type]
        data = dist.shard(dataset)
    else:
        sample = _probe_sample(run, data)
    counts = clean_and_pgd_counts(
        run.net,
        data,
        policy.threat,
        dist.device,
        batch_size=policy.data.eval_batch_size,
        probe_examples=probe,
        probe_steps=policy.train.probe_steps,
        seed=policy.seed,
        probe=sample,
    )
    right, total, adv_right, adv_total = dist.all_sum(counts)
    out = {"val_clean_acc": right / max(total, 1)}
    if adv_total:
        out["val_pgd_acc"] = adv_right / adv_total
    return out
