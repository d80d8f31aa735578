"""The hardening loss of a policy, for your own training loop (plain PyTorch, Lightning, accelerate).

:class:`HardeningLoss` is what one step of :func:`harden.fit` computes, as a torch-style loss
object: ``loss = loss_fn(x, y)`` is the policy's weighted sum of objectives on the batch (the
same :class:`~harden.objectives.ObjectiveSet` and :class:`~harden.objectives.BatchContext` fit
builds, so the adversarial views are computed once per batch and shared). The rest of the loop
(optimizer, schedule, epochs, data, devices, checkpoints) stays yours; see ``docs/own-loop.md``.

A plain loop: ``loss_fn.start_epoch(epoch, train_loader)`` before each epoch, then per batch
``loss = loss_fn(x, y)``, ``loss.backward()``, ``optimizer.step()``, ``loss_fn.after_step()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.attacks.suite import suite_labels
from harden.batches import unwrap_worker_errors
from harden.data import DataBundle, check_batch, check_labels, to_device
from harden.errors import CheckpointError, DataError, HardenError, InputError, ModelError, PolicyError
from harden.fit_setup import epoch_loader
from harden.models import Normalized, check_model, model_device, prepare_model
from harden.objectives import OBJECTIVES, Objective, ObjectiveSet
from harden.objectives.base import BatchContext
from harden.policy import Policy
from harden.policy_io import checked, load_policy
from harden.speed import autocast_dtype

__all__ = ["HardeningLoss"]


def _resolve_policy(policy: Policy | str | Path, allow_code: bool | Sequence[str]) -> Policy:
    """A checked policy from a :class:`Policy` or a YAML file."""
    if isinstance(policy, (str, Path)):
        return load_policy(policy, allow_code=allow_code)
    if not isinstance(policy, Policy):
        raise PolicyError(f"expected a harden.Policy or a policy file path, got {type(policy).__name__}")
    return checked(policy)


def _acts_at_epochs(obj: Objective) -> bool:
    """Whether the objective overrides :meth:`Objective.begin_epoch` (e.g. ``mi``'s warm-up)."""
    return type(obj).begin_epoch is not Objective.begin_epoch


def _warn_unsynced(model: nn.Module) -> None:
    """Warn when several processes train but ``model`` is not the DDP-wrapped one (no gradient sync)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        warnings.warn(
            f"HardeningLoss: {dist.get_world_size()} processes train, but the model is not wrapped in "
            "DistributedDataParallel: its gradients are not synchronised, so each process trains its own model; "
            "pass the DDP-wrapped model (or use harden.fit under torchrun)",
            UserWarning,
            stacklevel=3,
        )


class HardeningLoss:
    """The policy's weighted hardening loss on a batch, for your own training loop.

    ``loss_fn(x, y)`` returns what one step of :func:`harden.fit` minimises: the policy's
    objectives (``weight`` > 0, ``every:`` honoured) summed by weight, with the policy's threat
    model, ``train.bn_stats``, ``train.precision`` (autocast of the training forwards; the
    gradient scaler for fp16 is your loop's) and ``train.attack_precision``. The policy's
    optimizer, schedule, epochs, data, device, ``grad_clip``, ``compile`` and ``channels_last``
    are your loop's business and are not read. Attacks draw from torch's global RNG: seed it
    (``torch.manual_seed(policy.seed)``, as fit does) for a repeatable run.

    The model: a plain ``nn.Module`` or a :class:`~harden.models.Normalized`, on any device;
    batches must be on the model's device (nothing is moved). A plain module is wrapped in
    :class:`~harden.models.Normalized` with the policy's ``model.mean``/``model.std`` when the
    policy states them (a ``UserWarning`` says so: feed pixels in [0, 1] then, not normalized
    tensors); a ``Normalized`` model keeps its own. The forwards run in the mode the model is in
    (call ``model.train()`` as usual); attacks run in eval mode, and every submodule's mode is
    restored when a call returns.

    The objectives are built on the first batch (they size themselves from it, e.g. ``mi``'s
    estimators, on the batch's device). Nothing here is trainable by your optimizer: ``mi``'s
    estimators train with their own optimizer, inside.

    Args:
        model: the classifier being trained (logits out).
        policy: a :class:`~harden.Policy` or the path of a policy file.
        bundle: the policy's data (:func:`harden.data.load_data`), if you use it: labels are
            checked against its classes and channels, and :meth:`start_epoch` takes its training
            split when you pass no batches.
        allow_code: for a policy file: which code it may name (see :func:`harden.load_policy`).

    Attributes:
        last_terms: each objective's weighted loss in the last call (0.0 where ``every:`` skipped
            it), keyed by objective name (``pgd_at``, ``pgd_at#2`` for a second one).
        names: those keys, in policy order.
        normalization: what the model sees: "mean (...), std (...)" or "none: pixels in [0, 1]".

    Raises:
        PolicyError: the policy is invalid or has no objective with a weight > 0.
        ModelError: ``model`` is not an ``nn.Module``.

    Example:
        >>> from harden.testing import TinyCNN, synthetic_tensors, tiny_policy
        >>> model = TinyCNN(num_classes=3).train()
        >>> loss_fn = HardeningLoss(model, tiny_policy(objectives=[{"name": "pgd_at", "params": {"steps": 2}}]))
        >>> x, y = synthetic_tensors(16, seed=1)
        >>> loss = loss_fn(x, y)
        >>> loss.backward()
        >>> loss_fn.after_step()
        >>> list(loss_fn.last_terms), bool(loss > 0), model.training
        (['pgd_at'], True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy | str | Path,
        *,
        bundle: DataBundle | None = None,
        allow_code: bool | Sequence[str] = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if bundle is not None and not isinstance(bundle, DataBundle):
            raise DataError(
                f"expected bundle as a harden.data.DataBundle (load_data(...)), got {type(bundle).__name__}"
            )
        self.policy = _resolve_policy(policy, allow_code)
        _warn_unsynced(model)
        self.model = model
        self.net: Normalized = prepare_model(model, self.policy.model)
        if self.net is not model and self.net.has_norm:
            warnings.warn(
                f"HardeningLoss: normalizing inside the model with the policy's model.mean {self.net.mean_values} and "
                f"model.std {self.net.std_values}; feed pixels in [0, 1], not normalized tensors",
                UserWarning,
                stacklevel=2,
            )
        self.normalization = (
            f"mean {self.net.mean_values}, std {self.net.std_values}"
            if self.net.has_norm
            else "none: the model sees pixels in [0, 1]"
        )
        specs = [s for s in self.policy.objectives if s.weight > 0]
        if not specs:
            raise PolicyError("expected at least one objective with weight > 0, got none")
        threat = self.policy.threat
        self.objectives: list[tuple[float, Objective]] = [
            (s.weight, OBJECTIVES.get(s.name)(s.params_for_build(), threat)) for s in specs
        ]
        self._every = [s.every for s in specs]
        self.names: list[str] = suite_labels([s.name for s in specs])
        #: the objectives with epoch hooks (mi): start_epoch must come before the first batch
        self.epoch_objectives = [n for n, (_, o) in zip(self.names, self.objectives, strict=True) if _acts_at_epochs(o)]
        self.bundle = bundle
        self.num_classes: int | None = bundle.num_classes if bundle is not None else None
        self.in_chans: int | None = bundle.in_chans if bundle is not None else None
        self.last_terms: dict[str, float] = {}
        self.mix: ObjectiveSet | None = None  # built on the first batch
        self._pending_state: Mapping[str, Any] | None = None
        self._ctx: BatchContext | None = None  # the last training call's, until after_step
        self._epoch: int | None = None

    def _build(self, example: torch.Tensor) -> ObjectiveSet:
        """The objective set, built once on a batch of the model's device."""
        if self.mix is not None:
            return self.mix
        self._follow(example.device)
        n_logits = check_model(self.net, example[:1], self.num_classes)  # logits, channels: one-line errors
        self.num_classes = self.num_classes if self.num_classes is not None else n_logits
        spec = self.policy.train
        mix = ObjectiveSet(
            self.net,
            self.objectives,
            example[:1].detach(),
            bn_stats=spec.bn_stats,
            autocast_dtype=autocast_dtype(spec.precision, example.device),
            attack_precision=spec.attack_precision,
            every=self._every,
        )
        if self._pending_state is not None:
            mix.load_state_dict(self._pending_state)
            self._pending_state = None
        self.mix = mix
        return mix

    def _follow(self, device: torch.device) -> None:
        """Keep the wrapper's own mean/std buffers on the model's device (they are not the user's)."""
        if self.net is not self.model and self.net.mean.device != device:
            self.net.mean, self.net.std = self.net.mean.to(device), self.net.std.to(device)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise InputError(f"expected x and y as torch tensors, got {type(x).__name__} and {type(y).__name__}")
        check_batch(x, y, None, self.in_chans)  # the labels against the classes once they are known (_build)
        device = model_device(self.model)
        if x.device != device or y.device != device:
            raise InputError(
                f"expected the batch on the model's device {device}, got x on {x.device} and y on {y.device}; "
                "move it first (x.to(device))"
            )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The weighted loss on the batch ``(x, y)`` (a scalar with grad to the model's parameters).

        A call with grad enabled is a training step: its :meth:`after_step` is pending until you
        call it (or the next training call runs it first). A call under ``torch.no_grad()``
        (validation) is not a step.

        Raises:
            InputError: ``x`` is not float NCHW pixels in [0, 1], or the batch is not on the
                model's device.
            DataError: ``y`` is not one integer label per image in the classes (the bundle's, else
                the model's logits).
            HardenError: an objective acts at epoch starts (``mi``) and :meth:`start_epoch` was
                never called.
        """
        self._check(x, y)
        mix = self._build(x)
        check_labels(y, self.num_classes)
        if self.epoch_objectives and self._epoch is None:
            raise HardenError(
                f"expected loss_fn.start_epoch(epoch, batches) before the first batch: objective(s) "
                f"{self.epoch_objectives} act at the start of every epoch (mi warms its estimators up)"
            )
        training = torch.is_grad_enabled()
        if training and self._ctx is not None:
            self.after_step()  # the last step's hooks, if the loop did not call them
        self._follow(x.device)
        modes = save_modes(self.net)
        try:
            ctx = mix.context(x, y, self.policy.threat)
            total, parts = mix.loss(ctx)
        finally:
            restore_modes(self.net, modes)
        self.last_terms = {n: float(p.detach()) for n, p in zip(self.names, parts, strict=True)}
        if training:
            self._ctx = ctx
        return total

    def after_step(self) -> None:
        """Run the objectives' post-step hooks on the last training batch; call after ``optimizer.step()``.

        It counts the step (``every:`` terms are computed on every N-th step) and runs per-step
        updates (``mi`` with ``estimators: alternating`` trains its estimators on the batch).
        If the loop does not call it, the next training call runs it first.

        Raises:
            HardenError: no training call since the last ``after_step``.
        """
        if self._ctx is None or self.mix is None:
            raise HardenError("expected a training call loss_fn(x, y) before after_step() (one after_step per step)")
        ctx, self._ctx = self._ctx, None
        modes = save_modes(self.net)
        try:
            self.mix.after_step(ctx)
        finally:
            restore_modes(self.net, modes)

    def start_epoch(
        self,
        epoch: int,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        *,
        progress: bool = False,
    ) -> None:
        """Tell the objectives that epoch ``epoch`` (0-based) starts; call before its first batch.

        ``mi`` records the epoch (its terms switch on at its ``start_epoch``) and, right before
        that epoch, trains its estimators for ``warmup_epochs`` passes over ``batches`` on the
        frozen model (eval mode; the modes are restored). Objectives without epoch hooks ignore it.

        Args:
            epoch: the epoch about to be trained (0-based; the same numbering as the policy's params).
            batches: the training batches ``(x, y)``, iterable more than once (a DataLoader, a
                list); they are checked and moved to the model's device. None: the bundle's
                training split in the policy's batch size and seeded order.
            progress: show the warm-up's progress bars.

        Raises:
            DataError: an objective needs the training batches now and there are none (no
                ``batches`` and no ``bundle``), or ``batches`` is a one-shot iterator.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise HardenError(f"expected epoch as an integer >= 0, got {epoch!r}")
        if batches is not None and iter(batches) is batches:
            raise DataError(
                "expected batches iterable more than once (a DataLoader or a list), got a one-shot iterator"
            )
        device_batches, given = self._epoch_batches(epoch, batches)
        # build on the first batch, so that a loaded state (mi warmed up) applies before the hooks run
        if self.mix is None and self.epoch_objectives and given:
            next(device_batches())  # an empty source raises the one-line error
        with torch.enable_grad():
            for _, obj in self.objectives:
                if _acts_at_epochs(obj):
                    obj.begin_epoch(epoch, self.net, device_batches, progress)
        self._epoch = epoch  # only once every hook ran: a failed warm-up does not let training start

    def _epoch_batches(
        self, epoch: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> tuple[Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], bool]:
        """Fresh passes over the checked training batches on the model's device, and whether there are any.

        The objective set is built on the first batch; without batches a pass raises the one-line error.
        """
        if batches is None and self.bundle is not None:
            batches = epoch_loader(self.bundle.train, self.policy, epoch)
        source = batches

        def fresh() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            if source is None:
                raise DataError(
                    f"expected training batches for the start of epoch {epoch} (objectives {self.epoch_objectives} "
                    "train on them now), got none; pass loss_fn.start_epoch(epoch, train_loader) or "
                    "HardeningLoss(..., bundle=...)"
                )
            device, seen = model_device(self.model), 0
            for xb, yb in unwrap_worker_errors(source):
                check_batch(xb, yb, self.num_classes, self.in_chans)
                x, y = to_device(xb, yb, device)
                self._build(x)
                seen += 1
                yield x, y
            if not seen:  # a warm-up over nothing would count as done
                raise DataError(f"expected training batches for the start of epoch {epoch}, got an empty iterable")

        return fresh, source is not None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume the objectives.

        Each objective's state (``mi``'s estimators and their optimizer, whether they warmed up)
        and the count of steps (``every:``). Tensors, lists and plain values only: ``torch.save``
        it beside your model (Lightning: ``on_save_checkpoint``). The epoch is not in it: your
        loop calls :meth:`start_epoch`.

        Raises:
            HardenError: no batch was seen yet (the objectives are built on the first one) and no
                state was loaded.

        Example:
            >>> from harden.testing import TinyCNN, synthetic_tensors, tiny_policy
            >>> lazy = {"name": "pgd_at", "params": {"steps": 2}, "every": 2}
            >>> policy = tiny_policy(objectives=[{"name": "ce"}, lazy])
            >>> loss_fn, (x, y) = HardeningLoss(TinyCNN(num_classes=3), policy), synthetic_tensors(8, seed=1)
            >>> loss_fn(x, y).backward()
            >>> loss_fn.after_step()
            >>> resumed = HardeningLoss(TinyCNN(num_classes=3), policy)
            >>> resumed.load_state_dict(loss_fn.state_dict())
            >>> resumed.names, int(resumed.state_dict()["objectives"]["steps_done"])
            (['ce', 'pgd_at'], 1)
        """
        if self.mix is None:
            if self._pending_state is not None:
                return {"names": list(self.names), "objectives": dict(self._pending_state)}
            raise HardenError("expected a first batch loss_fn(x, y) before state_dict(): the objectives build on it")
        return {"names": list(self.names), "objectives": self.mix.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (before or after the first batch).

        Raises:
            CheckpointError: the state is not a HardeningLoss state of the same objectives.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("objectives"), Mapping):
            raise CheckpointError(
                f"expected a HardeningLoss.state_dict() with 'names' and 'objectives', got {type(state).__name__}"
            )
        names = state.get("names")
        if not isinstance(names, (list, tuple)) or list(names) != self.names:
            raise CheckpointError(
                f"expected the state of objectives {self.names}, got {names!r:.80}; "
                "load it into a HardeningLoss of the same policy"
            )
        if self.mix is None:
            self._pending_state = state["objectives"]
        else:
            self.mix.load_state_dict(state["objectives"])

    def to(self, device: torch.device | str) -> HardeningLoss:
        """Move the loss's own state (the wrapper's mean/std, ``mi``'s estimators and their optimizer state).

        Not your model: move it yourself. Rarely needed: the objectives are built on the first
        batch's device.
        """
        device = torch.device(device)
        self._follow(device)
        for _, obj in self.objectives:
            for value in vars(obj).values():
                if isinstance(value, nn.Module):
                    value.to(device)
                elif isinstance(value, torch.optim.Optimizer):
                    value.load_state_dict(value.state_dict())  # recasts the state to its parameters' device
        return self

    def close(self) -> None:
        """Remove the hook an embedding-reading objective (``ot_metric``...) put on the model."""
        if self.mix is not None:
            self.mix.close()

    def __enter__(self) -> HardeningLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{n}" for (w, _), n in zip(self.objectives, self.names, strict=True))
        return f"HardeningLoss({terms}, {self.policy.threat.norm} eps={self.policy.threat.eps:g})"
