"""What one :func:`harden.fit` trains with: the :class:`FitRun` and its set-up.

:func:`set_up` seeds, builds or wraps the model on the policy's device, checks it on one
training image, and builds the objectives, optimizer, schedule and gradient scaler, before any
file is written. The stages that follow (:mod:`harden.fit_loop`, :mod:`harden.fit_state`) read
and update the :class:`FitRun` it returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harden.augment import augment_enabled, crop_padding
from harden.data import DataBundle, load_data, make_loader
from harden.distributed import Distributed
from harden.errors import DataError, HardenError
from harden.metrics_log import MetricsLog
from harden.model_load import build_model
from harden.models import Normalized, check_model, prepare_model
from harden.objectives import OBJECTIVES, Objective, ObjectiveSet
from harden.policy import Policy
from harden.speed import autocast_dtype, grad_scaler, to_memory_format, training_forward

__all__ = ["FitRun", "TrainData", "epoch_loader", "history_best", "improves", "resolve_data", "set_up"]

log = logging.getLogger("harden")

#: a training (or validation) set: a Dataset, or a user's DataLoader taken as it is
TrainData = DataLoader[Any] | Dataset[Any]


@dataclass
class FitRun:
    """What one fit trains with, built by :func:`set_up` and carried through the stages.

    Attributes:
        policy: the validated policy.
        dist: this process's place in the (possibly one-process) job.
        net: the model being trained (a :class:`Normalized` wrapper, on ``dist.device``).
        objectives: the ``(weight, objective)`` pairs with weight > 0, in policy order.
        mix: the :class:`harden.objectives.ObjectiveSet` of ``objectives``.
        optimizer: the policy's optimizer over ``net``'s trainable parameters.
        scheduler: the per-step learning-rate schedule.
        scaler: the gradient scaler (enabled for fp16 only).
        train: the training data.
        val: the validation data (None: no per-epoch probe).
        num_classes: classes labels must index (the data's, else the model's logits).
        in_chans: image channels batches must have (None: not checked).
        steps_per_epoch: optimizer steps an epoch (this rank's share).
        run_dir: where checkpoints and weights go.
        progress: show progress bars (rank 0 only).
        run_id: the run folder's run id (:class:`harden.runfolder.RunFolder`), kept in every
            checkpoint; a resume refuses checkpoints of another run ("": no run folder).
        history: one record per finished epoch.
        start_epoch: the first epoch to train (0-based; later when resumed).
        resumed_from: the checkpoint epoch training resumed from (None: from scratch).
        bad_run: consecutive non-finite losses so far, across epoch boundaries.
        augment: random crop and flip of the training batches (:mod:`harden.augment`).
        metrics: where each epoch's record goes (``metrics.csv``, TensorBoard); None: nowhere.
        probe_sample: the validation positions the PGD probe attacks (``probe_sampled``: drawn
            already; None once drawn: the first ``probe_examples``).
        best_epoch: the epoch of the best probe robust accuracy so far (None: no probe yet).
        best_value: that accuracy (an epoch improves on it only when strictly greater).
        best_state: the best epoch's weights on the CPU, kept for ``train.select: best`` (None:
            read back from ``checkpoints/best.safetensors`` when needed).
        stopped_early: ``train.early_stopping`` ended the training (kept in the checkpoint).
    """

    policy: Policy
    dist: Distributed
    net: Normalized
    objectives: list[tuple[float, Objective]]
    mix: ObjectiveSet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train: TrainData
    val: TrainData | None
    num_classes: int
    in_chans: int | None
    steps_per_epoch: int
    run_dir: Path
    progress: bool = False
    run_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    resumed_from: int | None = None
    bad_run: int = 0
    augment: bool = False
    metrics: MetricsLog | None = None
    probe_sample: torch.Tensor | None = None
    probe_sampled: bool = False
    best_epoch: int | None = None
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False

    @property
    def ckpt_dir(self) -> Path:
        """Where the epoch checkpoints go."""
        return self.run_dir / "checkpoints"

    def track_best(self, record: dict[str, Any]) -> bool:
        """Whether ``record``'s probe robust accuracy is a new best; if so, it becomes ``best_epoch`` / ``best_value``.

        With ``train.select: best`` the model's weights are kept on the CPU (``best_state``).
        """
        if not improves(record.get("val_pgd_acc"), self.best_value):
            return False
        self.best_epoch, self.best_value = int(record["epoch"]), float(record["val_pgd_acc"])
        if self.policy.train.select == "best":  # every rank keeps it: each returns the same model
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        return True

    @property
    def loss_names(self) -> list[str]:
        """History keys of each objective's weighted loss (none with a single objective)."""
        objectives = self.objectives
        return [f"loss_{i}_{obj.name}" for i, (_, obj) in enumerate(objectives)] if len(objectives) > 1 else []


def improves(value: Any, best: float | None) -> bool:
    """Whether a probe robust accuracy beats the best so far: a finite number strictly greater (a tie does not).

    Example:
        >>> improves(0.5, None), improves(0.5, 0.5), improves(0.6, 0.5), improves(None, 0.5)
        (True, False, True, False)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return best is None or value > best


def history_best(history: list[dict[str, Any]]) -> tuple[int | None, float | None]:
    """The first epoch of the highest ``val_pgd_acc`` in ``history`` and that value (None, None: no probe).

    Example:
        >>> history_best([{"epoch": e, "val_pgd_acc": v} for e, v in [(1, 0.2), (2, 0.5), (3, 0.5)]])
        (2, 0.5)
    """
    epoch, best = None, None
    for record in history:
        e, v = record.get("epoch"), record.get("val_pgd_acc")
        if isinstance(e, int) and not isinstance(e, bool) and isinstance(v, (int, float)) and improves(v, best):
            epoch, best = e, float(v)
    return epoch, best


def resolve_data(
    policy: Policy, train: TrainData | None, val: TrainData | None, bundle: DataBundle | None
) -> tuple[TrainData, TrainData | None, DataBundle | None]:
    """The training and validation data, and the bundle they came from (None: the caller's own data).

    ``load_data`` runs only when neither ``train`` nor ``bundle`` is given.
    """
    if bundle is not None and train is not None:
        raise DataError(
            "expected either train= data or bundle=, got both; pass the bundle alone (its train split trains)"
        )
    if train is None:
        if bundle is None:
            bundle = load_data(policy.data)
        train, val = bundle.train, (val if val is not None else bundle.test)
    return train, val, bundle


def set_up(
    model: nn.Module | None,
    policy: Policy,
    dist: Distributed,
    train: TrainData,
    val: TrainData | None,
    bundle: DataBundle | None,
    run_dir: Path,
    progress: bool = False,
) -> FitRun:
    """Seed, build or wrap the model on the policy's device, check it, and build objectives and optimizer.

    Nothing is written. ``torch.manual_seed(policy.seed)`` is called first, so call this inside
    ``torch.random.fork_rng`` to leave the caller's RNG as it was.

    Args:
        model: the user's model, or None to build the policy's (needs ``bundle``).
        policy: the validated policy.
        dist: this process's place in the job (its ``device`` is where training runs).
        train: the training data.
        val: the validation data, or None.
        bundle: the policy's data when ``train`` came from it (its classes and channels are
            checked on every batch), else None.
        run_dir: where checkpoints and weights will go.
        progress: show progress bars.

    Raises:
        DataError: no model and no bundle, or empty training data.
        ModelError: the model does not take the data's images or does not give logits.

    Example:
        >>> from harden.distributed import Distributed
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> b = synthetic_bundle()
        >>> policy = tiny_policy(objectives=[{"name": "ce"}])
        >>> run = set_up(None, policy, Distributed(torch.device("cpu")), b.train, b.test, b, Path("/tmp/h"))
        >>> run.num_classes, run.steps_per_epoch, run.start_epoch
        (3, 6, 0)
    """
    spec, device = policy.train, dist.device
    torch.manual_seed(policy.seed)
    net = _training_net(model, policy, dist, bundle)
    example = _example_batch(train).to(device)
    num_classes = bundle.num_classes if bundle else None
    n_logits = check_model(net, example, num_classes)  # channels, logits shape, softmax head: before any file
    specs = [s for s in policy.objectives if s.weight > 0]
    objectives: list[tuple[float, Objective]] = [
        (s.weight, OBJECTIVES.get(s.name)(s.params_for_build(), policy.threat)) for s in specs
    ]
    optimizer = _optimizer(net, policy)
    mix = _objective_set(net, objectives, [s.every for s in specs], example, policy, dist)
    steps_per_epoch = len(epoch_loader(train, policy, 0, dist))
    if steps_per_epoch == 0:
        raise DataError("expected training data, got an empty dataset")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(policy, steps_per_epoch))
    scaler = grad_scaler(spec.precision, device)
    augment = augment_enabled(policy.data)
    if augment:
        side = example.shape[-1]
        log.info(
            "augmenting training batches: random crop (zero padding %d px) and horizontal flip", crop_padding(side)
        )
    return FitRun(
        policy,
        dist,
        net,
        objectives,
        mix,
        optimizer,
        scheduler,
        scaler,
        train,
        val,
        num_classes if num_classes is not None else n_logits,  # user data: labels must index the logits
        bundle.in_chans if bundle else None,
        steps_per_epoch,
        run_dir,
        progress,
        augment=augment,
    )


def _training_net(model: nn.Module | None, policy: Policy, dist: Distributed, bundle: DataBundle | None) -> Normalized:
    """The policy's model built for the bundle's data (or the user's wrapped), on the device, in training format."""
    if model is None:
        if bundle is None:
            raise DataError("expected a model when passing train= data, got model=None; build your model and pass it")
        net = build_model(policy.model, bundle.num_classes, bundle.in_chans)
    else:
        net = prepare_model(model, policy.model)
    net.to(dist.device)  # the policy names the device; nothing moves anywhere else
    if policy.train.channels_last:
        to_memory_format(net, True)
    log.info("training %s on %s (rank %d of %d)", type(net.model).__name__, dist.device, dist.rank, dist.world_size)
    return net


def _objective_set(
    net: Normalized,
    objectives: list[tuple[float, Objective]],
    every: list[int],
    example: torch.Tensor,
    policy: Policy,
    dist: Distributed,
) -> ObjectiveSet:
    """The objectives ready to train ``net`` under the policy's BatchNorm, precision and compile settings."""
    spec = policy.train
    return ObjectiveSet(
        net,
        objectives,
        example,
        bn_stats=spec.bn_stats,
        # DDP (gradients averaged in backward), then torch.compile; attacks and saving use `net`
        forward_model=training_forward(dist.wrap(net), spec.compile),
        autocast_dtype=autocast_dtype(spec.precision, dist.device),
        attack_precision=spec.attack_precision,
        every=every,
    )


def _example_batch(train: TrainData) -> torch.Tensor:
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


def epoch_loader(data: TrainData, policy: Policy, epoch: int, dist: Distributed | None = None) -> DataLoader[Any]:
    """Epoch ``epoch``'s training batches: a user's DataLoader as it is, else a seeded shuffle.

    Under ``torchrun`` every rank gets its shard of the data (see :mod:`harden.distributed`).

    Example:
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> len(epoch_loader(synthetic_bundle().train, tiny_policy(), 0))  # 384 images, batches of 64
        6
    """
    if dist is not None and dist.enabled:
        d = policy.data
        return dist.train_loader(data, d.batch_size, policy.seed, epoch, d.num_workers)
    if isinstance(data, DataLoader):
        return data
    return make_loader(
        data, policy.data.batch_size, shuffle=True, seed=policy.seed, epoch=epoch, num_workers=policy.data.num_workers
    )
