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
from collections.abc import Callable
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
from harden.data import DataBundle, check_batch, load_data, make_loader, resolve_device, to_device
from harden.errors import DataError, HardenError
from harden.models import Normalized, build_model, prepare_model
from harden.objectives import OBJECTIVES, Objective, ObjectiveSet
from harden.policy import Policy, dump_policy, policy_hash

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


def _epoch_loader(data: Dataset[Any] | DataLoader[Any], policy: Policy, epoch: int) -> DataLoader[Any]:
    if isinstance(data, DataLoader):
        return data
    return make_loader(
        data, policy.data.batch_size, shuffle=True, seed=policy.seed, epoch=epoch, num_workers=policy.data.num_workers
    )


def _evaluate(
    model: Normalized, data: Dataset[Any] | DataLoader[Any], policy: Policy, device: torch.device, progress: bool
) -> dict[str, float]:
    from harden.verify import clean_and_pgd_accuracy

    return clean_and_pgd_accuracy(
        model,
        data,
        policy.threat,
        device,
        batch_size=policy.data.eval_batch_size,
        probe_examples=policy.train.probe_examples,
        probe_steps=policy.train.probe_steps,
        seed=policy.seed,
    )


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

    Example:
        >>> from harden.testing import tiny_policy
        >>> result = fit(None, tiny_policy(), run_dir="/tmp/harden-doctest", progress=False)  # doctest: +SKIP
        >>> result.history[-1]["val_clean_acc"] > 0.5  # doctest: +SKIP
        True
    """
    device = resolve_device(policy.device)
    # seeding inside fork_rng: fit is reproducible and leaves the caller's RNG as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _fit(model, policy, train, val, device, run_dir, resume, progress, on_epoch_end)


def _example_batch(train: DataLoader[Any] | Dataset[Any]) -> torch.Tensor:
    """One training image as a batch, read without touching any RNG (for objectives' setup)."""
    dataset = train.dataset if isinstance(train, DataLoader) else train
    try:
        x = dataset[0][0]
    except (IndexError, TypeError, KeyError) as exc:
        raise DataError(
            f"expected an indexable training set of (image, label) pairs, got {type(dataset).__name__}"
        ) from exc
    return torch.as_tensor(x).float().unsqueeze(0)


def _fit(
    model: nn.Module | None,
    policy: Policy,
    train: DataLoader[Any] | Dataset[Any] | None,
    val: DataLoader[Any] | Dataset[Any] | None,
    device: torch.device,
    run_dir: str | Path | None,
    resume: bool,
    progress: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> FitResult:
    t_start = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / policy.name
    ckpt_dir = run_dir / "checkpoints"

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
    log.info("training %s on %s", type(net.model).__name__, device)

    objectives: list[tuple[float, Objective]] = [
        (spec.weight, OBJECTIVES.get(spec.name)(spec.params, policy.threat))
        for spec in policy.objectives
        if spec.weight > 0
    ]
    mix = ObjectiveSet(net, objectives, _example_batch(train).to(device), bn_stats=policy.train.bn_stats)
    steps_per_epoch = len(_epoch_loader(train, policy, 0))
    if steps_per_epoch == 0:
        raise DataError("expected training data, got an empty dataset")
    optimizer = _optimizer(net, policy)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(policy, steps_per_epoch))

    history: list[dict[str, Any]] = []
    start_epoch, resumed_from = 0, None
    if resume:
        found = load_latest(ckpt_dir)
        if found is None:
            log.warning("resume requested but no intact checkpoint in %s; starting from scratch", ckpt_dir)
        else:
            start_epoch, state, info = found
            net.load_state_dict(state["model"])
            mix.load_state_dict(state.get("objectives", {}))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
            history = list(info.get("history", []))
            resumed_from = start_epoch
            log.info("resumed from epoch %d", start_epoch)

    p_hash = policy_hash(policy)
    atomic_write(run_dir / "policy.yaml", dump_policy(policy).encode())
    try:
        bad_run = 0  # consecutive non-finite losses, across epoch boundaries
        for epoch in range(start_epoch, policy.train.epochs):
            t_epoch = time.perf_counter()
            net.train()
            loader = _epoch_loader(train, policy, epoch)
            total, count, skipped = 0.0, 0, 0
            part_sums: dict[str, float] = {}  # weighted loss of each objective (when mixed)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{policy.train.epochs}", disable=not progress, leave=False)
            for step, (xb, yb) in enumerate(bar):
                check_batch(xb, yb, num_classes, in_chans)
                x, y = to_device(xb, yb, device)
                ctx = mix.context(x, y, policy.threat)
                loss, part_losses = mix.loss(ctx)
                parts = [(obj, part) for (_, obj), part in zip(objectives, part_losses, strict=True)]
                if not torch.isfinite(loss):
                    skipped += 1
                    bad_run += 1
                    optimizer.zero_grad(set_to_none=True)
                    bad = [o.name for o, p in parts if not torch.isfinite(p)]
                    if bad_run >= MAX_BAD_STEPS:
                        raise HardenError(
                            f"expected finite losses, got {bad_run} non-finite in a row (epoch {epoch + 1}, batch {step}, "
                            f"objectives {bad}); lower train.lr or check the data"
                        )
                    continue
                bad_run = 0
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if policy.train.grad_clip is not None:
                    nn.utils.clip_grad_norm_(net.parameters(), policy.train.grad_clip)
                optimizer.step()
                scheduler.step()
                mix.after_step(ctx)
                total += float(loss.detach()) * x.shape[0]
                count += x.shape[0]
                for i, (obj, part) in enumerate(parts):
                    key = f"loss_{i}_{obj.name}" if len(parts) > 1 else ""
                    if key:
                        part_sums[key] = part_sums.get(key, 0.0) + float(part.detach()) * x.shape[0]
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
            bar.close()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": total / max(count, 1),
                **{k: v / max(count, 1) for k, v in part_sums.items()},
                "skipped_steps": skipped,
            }
            if val is not None:
                record.update(_evaluate(net, val, policy, device, progress))
            record["seconds"] = time.perf_counter() - t_epoch
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, record)
            if on_epoch_end is not None:
                on_epoch_end(record)
            last = epoch + 1 == policy.train.epochs
            if last or (epoch + 1) % policy.train.checkpoint_every == 0:
                state = {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "objectives": mix.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    },
                }
                save_checkpoint(ckpt_dir, epoch + 1, state, {"history": history, "policy_hash": p_hash})
                prune_checkpoints(ckpt_dir, policy.train.keep_checkpoints)

    finally:
        mix.close()
    net.eval()
    weights = run_dir / "model.safetensors"
    save_model(net, weights, {"policy_hash": p_hash, "epochs": policy.train.epochs, "history": history})
    return FitResult(net, history, run_dir, weights, time.perf_counter() - t_start, resumed_from)


def load_trained(policy: Policy, weights: str | Path) -> tuple[Normalized, DataBundle]:
    """Rebuild the policy's model and load ``model.safetensors`` (hash-checked against ``model.json``).

    Returns the model (eval mode, on CPU) and the policy's data bundle.

    Raises:
        CheckpointError: the weights file is missing or fails its SHA-256 in ``model.json``.
    """
    from safetensors.torch import load as st_load

    from harden.checkpoint import sha256_file
    from harden.errors import CheckpointError

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
