"""``harden.fit``: train a model on the weighted sum of the policy's objectives.

Each epoch ends with clean and PGD validation accuracy and a checkpoint (safetensors + JSON
sidecar, atomic). ``resume=True`` continues from the newest intact checkpoint of ``run_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from harden.checkpoint import (
    atomic_write,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
    state_bytes,
)
from harden.data import DataBundle, check_batch, load_data, make_loader, to_device
from harden.distributed import Distributed, distributed_session
from harden.errors import CheckpointError, DataError, HardenError
from harden.models import Normalized, build_model, check_model, prepare_model
from harden.objectives import OBJECTIVES, Objective, ObjectiveSet
from harden.policy import Policy, dump_policy, policy_hash
from harden.speed import autocast_dtype, grad_scaler, to_memory_format, training_forward

__all__ = ["FitResult", "fit", "load_trained", "save_model"]

log = logging.getLogger("harden")

#: Consecutive non-finite losses after which training aborts.
MAX_BAD_STEPS = 10


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model (a :class:`Normalized` wrapper, in eval mode).
        history: one record per epoch (``epoch``, ``lr``, ``train_loss``, ``val_clean_acc``,
            ``val_pgd_acc``, ``seconds``, ``skipped_steps``).
        run_dir: where checkpoints and ``model.safetensors`` were written.
        weights: path of the final ``model.safetensors``.
        seconds: wall time of this call.
        resumed_from: the checkpoint epoch training resumed from (None: from scratch).
        info: ``rank`` and ``world_size`` of this process (``world_size`` > 1 under ``torchrun``;
            only rank 0 wrote the files).
    """

    model: Normalized
    history: list[dict[str, Any]]
    run_dir: Path
    weights: Path
    seconds: float = 0.0
    resumed_from: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _lr_lambda(policy: Policy, steps_per_epoch: int) -> Callable[[int], float]:
    t = policy.train
    total = max(1, t.epochs * steps_per_epoch)
    warm = round(t.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if t.schedule == "step":
            epoch = step / steps_per_epoch
            return t.gamma ** sum(epoch >= m for m in t.milestones)
        return 1.0

    return factor


def _optimizer(model: nn.Module, policy: Policy) -> torch.optim.Optimizer:
    t = policy.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HardenError("expected a model with trainable parameters, got none (all requires_grad=False)")
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.momentum > 0)


def save_model(model: Normalized, path: Path, info: dict[str, Any]) -> str:
    """Write ``model.safetensors`` and ``model.json`` (with its SHA-256) atomically; returns the hash."""
    blob = state_bytes(model)
    digest = hashlib.sha256(blob).hexdigest()
    atomic_write(path, blob)

    atomic_write(
        path.with_suffix(".json"), json.dumps({"file": path.name, "sha256": digest, **info}, indent=1).encode()
    )
    return digest


def _epoch_loader(
    data: Dataset[Any] | DataLoader[Any], policy: Policy, epoch: int, dist: Distributed | None = None
) -> DataLoader[Any]:
    if dist is not None and dist.enabled:
        d = policy.data
        return dist.train_loader(data, d.batch_size, policy.seed, epoch, d.num_workers)
    if isinstance(data, DataLoader):
        return data
    return make_loader(
        data, policy.data.batch_size, shuffle=True, seed=policy.seed, epoch=epoch, num_workers=policy.data.num_workers
    )


def _evaluate(
    model: Normalized, data: Dataset[Any] | DataLoader[Any], policy: Policy, dist: Distributed
) -> dict[str, float]:
    """Clean accuracy and the PGD probe; under torchrun each rank takes its shard and counts are summed."""
    from harden.verify import clean_and_pgd_counts

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


def fit(
    model: nn.Module | None,
    policy: Policy,
    train: DataLoader[Any] | Dataset[Any] | None = None,
    val: DataLoader[Any] | Dataset[Any] | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` (or the policy's model) on the policy's weighted objectives.

    Args:
        model: an ``nn.Module`` (wrapped in :class:`Normalized` with the policy's mean/std), or
            None to build the model the policy names.
        policy: the validated policy.
        train: training data (Dataset or DataLoader); None loads the policy's data.
        val: validation data; None uses the policy's test split (when ``train`` is None too).
        run_dir: where checkpoints go; default ``runs/<policy.name>``.
        resume: continue from the newest intact checkpoint in ``run_dir``.
        progress: show a progress bar.
        on_epoch_end: called with each epoch's history record.

    Returns:
        A :class:`FitResult`; the model is in eval mode on the policy's device.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls ``fit`` and trains one
    ``DistributedDataParallel`` replica on its shard of the data; only rank 0 writes files and
    every rank returns the same model (see :mod:`harden.distributed`).

    Example:
        >>> from harden.testing import tiny_policy
        >>> result = fit(None, tiny_policy(), run_dir="/tmp/harden-doctest", progress=False)  # doctest: +SKIP
        >>> result.history[-1]["val_clean_acc"] > 0.5  # doctest: +SKIP
        True
    """
    with distributed_session(policy.device) as dist:
        device = dist.device
        # seeding inside fork_rng: fit is reproducible and leaves the caller's RNG as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _fit(model, policy, train, val, dist, run_dir, resume, progress, on_epoch_end)


def _example_batch(train: DataLoader[Any] | Dataset[Any]) -> torch.Tensor:
    """One training image as a batch, read without touching any RNG (for objectives' setup)."""
    dataset = train.dataset if isinstance(train, DataLoader) else train
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise DataError("expected training data, got an empty dataset")
    try:
        x = dataset[0][0]
    except (IndexError, TypeError, KeyError) as exc:
        raise DataError(
            f"expected an indexable training set of (image, label) pairs, got {type(dataset).__name__}"
        ) from exc
    return torch.as_tensor(x).float().unsqueeze(0)


def _resume_hash(policy: Policy) -> str:
    """The policy's hash with ``train.epochs`` left out: resuming to train longer is not a policy change."""
    return policy_hash(policy.model_copy(update={"train": policy.train.model_copy(update={"epochs": 1})}))


def _fit(
    model: nn.Module | None,
    policy: Policy,
    train: DataLoader[Any] | Dataset[Any] | None,
    val: DataLoader[Any] | Dataset[Any] | None,
    dist: Distributed,
    run_dir: str | Path | None,
    resume: bool,
    progress: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> FitResult:
    t_start = time.perf_counter()
    device, spec = dist.device, policy.train
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / policy.name
    ckpt_dir = run_dir / "checkpoints"
    progress = progress and dist.is_main

    bundle: DataBundle | None = None
    if train is None:
        bundle = load_data(policy.data)
        train, val = bundle.train, (val if val is not None else bundle.test)
    num_classes = bundle.num_classes if bundle else None
    in_chans = bundle.in_chans if bundle else None

    torch.manual_seed(policy.seed)
    if model is None:
        if bundle is None:
            raise DataError("expected a model when passing train= data, got model=None; build your model and pass it")
        net = build_model(policy.model, bundle.num_classes, bundle.in_chans)
    else:
        net = prepare_model(model, policy.model)
    net.to(device)  # the policy names the device; nothing moves anywhere else
    if spec.channels_last:
        to_memory_format(net, True)
    log.info("training %s on %s (rank %d of %d)", type(net.model).__name__, device, dist.rank, dist.world_size)
    example = _example_batch(train).to(device)
    n_logits = check_model(net, example, num_classes)  # channels, logits shape, softmax head: before any file
    if num_classes is None:  # user data: labels must index the model's logits
        num_classes = n_logits

    specs = [s for s in policy.objectives if s.weight > 0]
    objectives: list[tuple[float, Objective]] = [
        (s.weight, OBJECTIVES.get(s.name)(s.params, policy.threat)) for s in specs
    ]
    optimizer = _optimizer(net, policy)
    amp_dtype = autocast_dtype(spec.precision, device)
    mix = ObjectiveSet(
        net,
        objectives,
        example,
        bn_stats=spec.bn_stats,
        # DDP (gradients averaged in backward), then torch.compile; attacks and saving use `net`
        forward_model=training_forward(dist.wrap(net), spec.compile),
        autocast_dtype=amp_dtype,
        attack_precision=spec.attack_precision,
        every=[s.every for s in specs],
    )
    steps_per_epoch = len(_epoch_loader(train, policy, 0, dist))
    if steps_per_epoch == 0:
        raise DataError("expected training data, got an empty dataset")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(policy, steps_per_epoch))
    scaler = grad_scaler(spec.precision, device)

    history: list[dict[str, Any]] = []
    start_epoch, resumed_from = 0, None
    if resume:
        found = load_latest(ckpt_dir)
        if found is None:
            log.warning("resume requested but no intact checkpoint in %s; starting from scratch", ckpt_dir)
        else:
            start_epoch, state, info = found
            try:
                net.load_state_dict(state["model"])
                mix.load_state_dict(state.get("objectives", {}))
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if scaler.is_enabled() and "scaler" in state:
                    scaler.load_state_dict(state["scaler"])
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                # torch's message starts with a header line ("Error(s) in loading ..."): name the first mismatch
                lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
                first = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]).rstrip(".")
                raise CheckpointError(
                    f"expected the checkpoint of epoch {start_epoch} in {ckpt_dir} to fit this policy's model, "
                    f"objectives and optimizer, got: {first[:300]}; resume only with the policy that wrote it, "
                    "or train into a new --out"
                ) from None
            stored = info.get("resume_hash")
            if stored and stored != _resume_hash(policy):
                warnings.warn(
                    f"the checkpoint in {ckpt_dir} was written under another policy (other than train.epochs; "
                    f"hash {str(stored)[:12]}..., now {_resume_hash(policy)[:12]}...); resuming with the current one",
                    RuntimeWarning,
                    stacklevel=3,
                )
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
            history = list(info.get("history", []))
            resumed_from = start_epoch
            log.info("resumed from epoch %d", start_epoch)
        if dist.enabled and dist.all_sum([start_epoch])[0] != start_epoch * dist.world_size:
            raise HardenError(
                f"expected every rank to resume from the same checkpoint, got epoch {start_epoch} on rank {dist.rank} "
                f"and others elsewhere; put {str(run_dir)!r} on a filesystem every node shares"
            )

    p_hash = policy_hash(policy)
    if dist.is_main:
        atomic_write(run_dir / "policy.yaml", dump_policy(policy).encode())
    names = [f"loss_{i}_{obj.name}" for i, (_, obj) in enumerate(objectives)] if len(objectives) > 1 else []
    try:
        bad_run = 0  # consecutive non-finite losses, across epoch boundaries
        for epoch in range(start_epoch, spec.epochs):
            t_epoch = time.perf_counter()
            if dist.enabled:  # each rank its own attack noise, replayable on resume
                torch.manual_seed(dist.epoch_seed(policy.seed, epoch))
            net.train()

            def batches(epoch: int = epoch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                return _device_batches(_epoch_loader(train, policy, epoch, dist), num_classes, in_chans, device, spec)

            mix.begin_epoch(epoch, batches, progress)  # e.g. MI's estimators warm up on the frozen model
            total, count, skipped = 0.0, 0, 0
            part_sums = dict.fromkeys(names, 0.0)  # weighted loss of each objective (when mixed)
            bar = tqdm(
                batches(),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{spec.epochs}",
                disable=not progress,
                leave=False,
            )
            for step, (x, y) in enumerate(bar):
                ctx = mix.context(x, y, policy.threat)
                loss, part_losses = mix.loss(ctx)
                finite = bool(torch.isfinite(loss))
                if dist.enabled:  # every rank skips together, or the gradient all-reduce would hang
                    finite = not dist.any(not finite)
                if not finite:
                    skipped += 1
                    bad_run += 1
                    optimizer.zero_grad(set_to_none=True)
                    if bad_run >= MAX_BAD_STEPS:
                        parts = zip(objectives, part_losses, strict=True)
                        bad = [o.name for (_, o), p in parts if not torch.isfinite(p)]
                        raise HardenError(
                            f"expected finite losses, got {bad_run} non-finite in a row (epoch {epoch + 1}, batch {step}, "
                            f"objectives {bad}); lower train.lr or check the data"
                        )
                    continue
                bad_run = 0
                _step(loss, net, optimizer, scaler, spec.grad_clip)
                scheduler.step()
                mix.after_step(ctx)
                total += float(loss.detach()) * x.shape[0]
                count += x.shape[0]
                for key, part in zip(names, part_losses, strict=False):
                    part_sums[key] += float(part.detach()) * x.shape[0]
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
            bar.close()
            dist.average_buffers(net)  # BatchNorm statistics: the same model on every rank
            loss_sum, n_seen, *sums = dist.all_sum([total, count, *part_sums.values()])  # over ranks
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / max(n_seen, 1),
                **{k: v / max(n_seen, 1) for k, v in zip(names, sums, strict=True)},
                "skipped_steps": skipped,
            }
            if val is not None:
                record.update(_evaluate(net, val, policy, dist))
            record["seconds"] = time.perf_counter() - t_epoch
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, record)
            if on_epoch_end is not None:
                on_epoch_end(record)
            last = epoch + 1 == spec.epochs
            if dist.is_main and (last or (epoch + 1) % spec.checkpoint_every == 0):
                state = {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "objectives": mix.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    },
                    **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                }
                save_checkpoint(
                    ckpt_dir,
                    epoch + 1,
                    state,
                    {"history": history, "policy_hash": p_hash, "resume_hash": _resume_hash(policy)},
                )
                prune_checkpoints(ckpt_dir, spec.keep_checkpoints)
            dist.barrier()  # the others wait for rank 0's files

    finally:
        mix.close()
    net.eval()
    if spec.channels_last:
        to_memory_format(net, False)
    weights = run_dir / "model.safetensors"
    if dist.is_main:
        save_model(net, weights, {"policy_hash": p_hash, "epochs": spec.epochs, "history": history})
    dist.barrier()
    info = {"rank": dist.rank, "world_size": dist.world_size}
    return FitResult(net, history, run_dir, weights, time.perf_counter() - t_start, resumed_from, info)


def _device_batches(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int | None,
    in_chans: int | None,
    device: torch.device,
    spec: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, checked, on ``device``, in the training memory format."""
    for xb, yb in loader:
        check_batch(xb, yb, num_classes, in_chans)
        x, y = to_device(xb, yb, device)
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


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


def load_trained(policy: Policy, weights: str | Path) -> tuple[Normalized, DataBundle]:
    """Rebuild the policy's model and load ``model.safetensors`` (hash-checked against ``model.json``).

    Returns the model (eval mode, on CPU) and the policy's data bundle.

    Raises:
        CheckpointError: the weights file is missing or fails its SHA-256 in ``model.json``.
    """
    from safetensors.torch import load as st_load

    from harden.checkpoint import sha256_file

    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"expected trained weights at {str(weights)!r}, got no such file; run `harden fit` first")
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        expected = json.loads(sidecar.read_text()).get("sha256")
        found = sha256_file(weights)
        if expected != found:
            raise CheckpointError(
                f"expected SHA-256 {expected} for {str(weights)!r} (from {sidecar.name}), got {found}"
            )
    bundle = load_data(policy.data)
    net = build_model(policy.model, bundle.num_classes, bundle.in_chans)
    try:
        net.load_state_dict(st_load(weights.read_bytes()))
    except RuntimeError as exc:
        raise CheckpointError(
            f"expected weights for the policy's model in {str(weights)!r}, got {str(exc).splitlines()[0]}"
        ) from None
    return net.eval(), bundle
