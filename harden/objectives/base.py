"""The objective contract and the per-batch context that shares adversarial views.

An objective declares the perturbed views it needs (:meth:`Objective.views`) and computes its
loss from a :class:`BatchContext`. The context computes each view once per batch and caches
the model's logits on it, so ``pgd_at + trades + ...`` never attacks or forwards twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from harden.errors import CheckpointError, ModelError, PolicyError
from harden.objectives.embedding import EmbeddingTap
from harden.policy import AttackSpec, ThreatModel
from harden.registry import Registry

__all__ = [
    "ATTACK_PRECISIONS",
    "BN_STATS",
    "OBJECTIVES",
    "BatchContext",
    "Objective",
    "ObjectiveParams",
    "ObjectiveSet",
    "View",
    "frozen_bn_statistics",
    "pgd_view",
]


#: a fresh pass over an epoch's training batches ``(x, y)`` on the model's device (see ``begin_epoch``)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class ObjectiveParams(BaseModel):
    """Base of every objective's parameters (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class View:
    """A perturbed view of the batch: an attack (by registry name) with its parameters.

    Two objectives asking for equal views share one computation.

    Example:
        >>> View.of("pgd", {"steps": 7}) == View.of("pgd", {"steps": 7})
        True
    """

    attack: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, attack: str, params: Mapping[str, Any] | None = None) -> View:
        """Build a hashable view from an attack name and a parameter mapping."""
        return cls(attack, tuple(sorted((params or {}).items())))


def pgd_view(steps: int, step_size: float | None = None, random_start: bool = True) -> View:
    """The PGD view of adversarial training (last iterate), shared by every objective asking it.

    ``pgd_at``, ``mi`` and ``ot_metric`` with equal ``steps`` (and step size) read the same view,
    so the PGD examples are computed once per batch.

    Example:
        >>> pgd_view(5) == pgd_view(5), pgd_view(5) == pgd_view(7)
        (True, False)
    """
    return View.of("pgd", {"steps": steps, "step_size": step_size, "random_start": random_start, "select": "last"})


BN_STATS = ("first_forward", "every_forward")
ATTACK_PRECISIONS = ("fp32", "same")


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Train-mode forwards inside leave every BatchNorm's running statistics untouched.

    Normalization still uses the batch's own statistics (train mode); only the running mean,
    variance and batch counter that eval mode will use are restored afterwards.

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> with frozen_bn_statistics(bn):
        ...     _ = bn(torch.randn(8, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    # momentum 0 makes the in-place update a no-op (running = 1 * running + 0 * batch) without
    # touching tensors autograd may have saved; the batch counter is restored afterwards.
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]  # type: ignore[union-attr]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, count) in zip(bns, saved, strict=True):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)  # type: ignore[union-attr]


class BatchContext:
    """Everything objectives share for one batch: inputs, views, cached logits and embeddings.

    Args:
        model: the model being trained (in train mode).
        x: clean pixels in [0, 1].
        y: labels.
        threat: the policy's threat model.
        tap: where embeddings are read (set when an objective needs them).
        clean_input_grad: make the clean input a leaf that requires grad, so objectives can
            differentiate the clean logits w.r.t. the input (double backprop).
        bn_stats: ``first_forward`` (default): only the batch's first training-mode forward
            (the first objective's input) updates BatchNorm running statistics; the other
            views (clean, IWD, invariance, noisy ...) are normalised with their own batch
            statistics but do not move the statistics eval mode uses. ``every_forward``: every
            forward updates them (the running statistics then describe a mixture of views).
        forward_model: what the training forwards (:meth:`forward`) call, when not ``model``
            itself: its ``DistributedDataParallel`` or ``torch.compile`` wrapper. Attacks
            always run on ``model``, the plain module.
        autocast_dtype: run the training forwards under ``torch.autocast`` to this dtype
            (``bfloat16`` / ``float16``); the logits and embeddings they return are float32.
        attack_precision: ``fp32`` (default): views are computed with autocast disabled;
            ``same``: under the training forwards' autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        *,
        tap: EmbeddingTap | None = None,
        clean_input_grad: bool = False,
        bn_stats: str = "first_forward",
        forward_model: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
        attack_precision: str = "fp32",
    ) -> None:
        if bn_stats not in BN_STATS:
            raise PolicyError(f"expected bn_stats in {BN_STATS}, got {bn_stats!r}")
        if attack_precision not in ATTACK_PRECISIONS:
            raise PolicyError(f"expected attack_precision in {ATTACK_PRECISIONS}, got {attack_precision!r}")
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self.autocast_dtype = autocast_dtype
        self.attack_precision = attack_precision
        self.bn_stats = bn_stats
        self.x = x.detach().requires_grad_(True) if clean_input_grad else x
        self.y = y
        self.threat = threat
        self.tap = tap
        self._views: dict[View, torch.Tensor] = {}
        self._logits: dict[View | None, torch.Tensor] = {}
        self._embeddings: dict[View | None, torch.Tensor] = {}
        self._memo: dict[Any, Any] = {}
        self.view_calls = 0  # attacks actually run (for tests and profiling)
        self.forward_calls = 0  # training-mode forwards (for tests and profiling)

    def view(self, view: View) -> torch.Tensor:
        """The perturbed inputs for ``view``, computed on first request (no grad to params)."""
        if view not in self._views:
            from harden.attacks.suite import build_attack

            attack = build_attack(AttackSpec(name=view.attack, params=dict(view.params)), self.threat)
            with self.attack_precision_scope():
                self._views[view] = attack(self.model, self.x.detach(), self.y)
            self.view_calls += 1
        return self._views[view]

    def attack_precision_scope(self) -> AbstractContextManager[None]:
        """Where attacks run: autocast disabled (``fp32``) or the training autocast (``same``).

        Objectives that run an attack themselves (not through :meth:`view`) enter it too.
        """
        from harden.speed import autocast

        dtype = self.autocast_dtype if self.attack_precision == "same" else None
        return autocast(self.x.device, dtype)

    def forward(self, key: Any, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` under ``key`` (cached; the embedding is kept when tapped)."""
        if key not in self._logits:
            if self.forward_calls and self.bn_stats == "first_forward" and self.model.training:
                with frozen_bn_statistics(self.model):
                    logits = self._run(inputs)
            else:
                logits = self._run(inputs)
            self._logits[key] = logits
            self.forward_calls += 1
            if self.tap is not None:
                emb = self.tap.take()
                self._embeddings[key] = emb.float() if self.autocast_dtype is not None else emb
        return self._logits[key]

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.forward_model(inputs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.autocast_dtype):
            out = self.forward_model(inputs)
        return out.float()

    def forward_eval(self, key: Any, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` with the model in eval mode, with grad, cached under ``key``.

        BatchNorm then normalises with its running statistics (not updated): every example's
        logits depend on that example alone, as per-example input gradients and Jacobians
        assume (in train mode the batch statistics couple the examples). The modes are restored.
        """
        if key not in self._logits:
            saved = {m: m.training for m in self.model.modules()}
            self.model.eval()
            try:
                self._logits[key] = self._run(inputs)
            finally:
                for m, mode in saved.items():
                    m.train(mode)
            self.forward_calls += 1
        return self._logits[key]

    def logits(self, view: View | None = None) -> torch.Tensor:
        """Model logits (with grad) on the clean batch (``None``) or on ``view``, cached."""
        return self.forward(view, self.x if view is None else self.view(view))

    def embedding(self, key: Any = None) -> torch.Tensor:
        """The embedding recorded with the logits of ``key`` (a view, None, or a forward key)."""
        if self.tap is None:
            raise ModelError(
                "expected an embedding tap on the context (the trainer sets one when an objective needs it)"
            )
        if key not in self._embeddings:
            if isinstance(key, View) or key is None:
                self.logits(key)
            else:
                raise ModelError(f"expected a forward under {key!r} before reading its embedding")
        return self._embeddings[key]

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per batch under ``key`` (share any per-batch result)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


OBJECTIVES: Registry[type[Objective]] = Registry("objective", entry_point_group="harden.objectives")


class Objective(ABC):
    """Base class of every training objective.

    Subclasses set ``name`` and ``Params``, and implement :meth:`loss`; they list the views
    they use in :meth:`views` so the trainer can plan (and tests can check sharing).

    Args:
        params: the objective's parameters (a mapping or its ``Params`` instance).
        threat: the policy's threat model.

    Example:
        >>> from harden.testing import TinyMLP
        >>> obj = OBJECTIVES.get("ce")({}, ThreatModel())
        >>> ctx = BatchContext(TinyMLP(num_classes=2), torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 1, 0]), ThreatModel())
        >>> obj.loss(ctx).shape
        torch.Size([])
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = ObjectiveParams
    #: The clean input must require grad (the objective differentiates w.r.t. it).
    needs_input_grad: bool = False

    def __init__(self, params: BaseModel | Mapping[str, Any] | None, threat: ThreatModel) -> None:
        self.threat = threat
        if isinstance(params, self.Params):
            self.params: Any = params
        else:
            try:
                self.params = self.Params.model_validate(dict(params or {}))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise PolicyError(f"{self.name} params: {where}: {err['msg']}") from None

    def views(self) -> tuple[View, ...]:
        """The perturbed views this objective reads from the context."""
        return ()

    def embedding_layer(self) -> str | bool | None:
        """Where this objective reads embeddings.

        False: it does not; None: the classifier's input; a string: that layer's output.
        """
        return False

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Build what the objective owns (e.g. estimator networks) once, before training.

        Args:
            model: the model to train, on its device.
            example: one clean input batch (at least one image) on that device.
        """

    def after_step(self, ctx: BatchContext) -> None:  # noqa: B027 - optional hook
        """Run after the model's optimizer step, on the same batch (e.g. train estimators)."""

    def begin_epoch(  # noqa: B027 - optional hook
        self,
        epoch: int,
        model: nn.Module,
        batches: Batches,
        progress: bool = False,
    ) -> None:
        """Run before epoch ``epoch`` (0-based) trains, e.g. to train owned networks on the frozen model.

        Args:
            epoch: the epoch about to be trained.
            model: the plain model (not its DDP or compiled wrapper), in train mode; leave it so.
            batches: a fresh pass over this epoch's training batches ``(x, y)`` on the model's
                device (this process's shard under ``torchrun``).
            progress: whether the caller shows progress bars.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep of this objective (default: nothing)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            CheckpointError: the state does not belong to this objective.
        """
        if state:
            raise CheckpointError(f"expected no saved state for objective {self.name!r}, got keys {sorted(state)}")

    @abstractmethod
    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """The scalar loss for the batch in ``ctx`` (differentiable w.r.t. the model)."""


class ObjectiveSet:
    """The weighted objectives of a policy, ready to train ``model``.

    Resolves what the mix needs once: the embedding tap (one layer for all objectives), a
    clean input that requires grad (double backprop), and each objective's :meth:`Objective.setup`.

    Args:
        model: the model to train, on its device.
        weighted: ``(weight, objective)`` pairs.
        example: one clean input batch on the model's device (for setup).
        bn_stats: which forwards update BatchNorm running statistics (see :class:`BatchContext`).
        forward_model: the training forwards' DDP / compiled wrapper of ``model`` (see
            :class:`BatchContext`); None: ``model``.
        autocast_dtype: the training forwards' autocast dtype (None: float32).
        attack_precision: ``fp32`` or ``same`` (see :class:`BatchContext`).
        every: per objective, compute it on every N-th step only (None: every step). A skipped
            objective adds a zero to the loss and its :meth:`Objective.after_step` does not run;
            the count of steps taken is part of :meth:`state_dict`, so a resumed run keeps the phase.

    Raises:
        PolicyError: two objectives ask for different embedding layers, or ``every`` does not
            give one integer >= 1 per objective with at least one of them 1.

    Example:
        >>> from harden.testing import TinyCNN
        >>> model, x, y = TinyCNN(num_classes=3), torch.rand(4, 1, 8, 8), torch.arange(4) % 3
        >>> objs = ObjectiveSet(model, [(1.0, OBJECTIVES.get("ce")({}, ThreatModel()))], x[:1])
        >>> float(objs.loss(objs.context(x, y, ThreatModel()))[0]) > 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        weighted: list[tuple[float, Objective]],
        example: torch.Tensor,
        bn_stats: str = "first_forward",
        *,
        forward_model: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
        attack_precision: str = "fp32",
        every: Sequence[int] | None = None,
    ) -> None:
        self.every = list(every) if every is not None else [1] * len(weighted)
        ints = all(isinstance(k, int) and not isinstance(k, bool) for k in self.every)
        if len(self.every) != len(weighted) or not ints or min(self.every, default=0) < 1 or 1 not in self.every:
            raise PolicyError(
                f"expected one integer every >= 1 per objective ({len(weighted)}), at least one of them 1 "
                f"(a step needs a loss), got {self.every}"
            )
        self.steps_done = 0
        self.model = model
        self.bn_stats = bn_stats
        self.forward_model = forward_model
        self.autocast_dtype = autocast_dtype
        self.attack_precision = attack_precision
        self.weighted = weighted
        layers = {o.embedding_layer() for _, o in weighted} - {False}
        if len(layers) > 1:
            raise PolicyError(f"expected one embedding layer for all objectives, got {sorted(map(str, layers))}")
        self.tap: EmbeddingTap | None = None
        if layers:
            layer = layers.pop()
            self.tap = EmbeddingTap(model, layer if isinstance(layer, str) else None)
        self.clean_input_grad = any(o.needs_input_grad for _, o in weighted)
        for _, obj in weighted:
            obj.setup(model, example)

    def context(self, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> BatchContext:
        """A fresh per-batch context with what these objectives need."""
        return BatchContext(
            self.model,
            x,
            y,
            threat,
            tap=self.tap,
            clean_input_grad=self.clean_input_grad,
            bn_stats=self.bn_stats,
            forward_model=self.forward_model,
            autocast_dtype=self.autocast_dtype,
            attack_precision=self.attack_precision,
        )

    def loss(self, ctx: BatchContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The weighted total and each objective's weighted part (zero where skipped this step)."""
        parts = [
            w * obj.loss(ctx) if on else ctx.x.new_zeros(())
            for (w, obj), on in zip(self.weighted, self.active(), strict=True)
        ]
        total = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        return total, parts

    def active(self) -> list[bool]:
        """Which objectives this step computes (see ``every``)."""
        return [self.steps_done % k == 0 for k in self.every]

    def after_step(self, ctx: BatchContext) -> None:
        """The post-step hook of every objective computed this step; counts the step."""
        for (_, obj), on in zip(self.weighted, self.active(), strict=True):
            if on:
                obj.after_step(ctx)
        self.steps_done += 1

    def begin_epoch(
        self,
        epoch: int,
        batches: Batches,
        progress: bool = False,
    ) -> None:
        """Every objective's pre-epoch hook (see :meth:`Objective.begin_epoch`)."""
        for _, obj in self.weighted:
            obj.begin_epoch(epoch, self.model, batches, progress)

    def state_dict(self) -> dict[str, Any]:
        """Each objective's state, keyed by position, and the count of finite steps taken (``steps_done``)."""
        state: dict[str, Any] = {str(i): obj.state_dict() for i, (_, obj) in enumerate(self.weighted)}
        state["steps_done"] = torch.tensor(self.steps_done)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a checkpoint without a step count starts the count at 0).

        Raises:
            CheckpointError: the step count is not one integer >= 0.
        """
        steps = state.get("steps_done", torch.tensor(0))
        if not (isinstance(steps, torch.Tensor) and steps.numel() == 1 and not steps.is_floating_point()) or (
            int(steps) < 0
        ):
            raise CheckpointError(f"expected the objectives' steps_done to be one integer >= 0, got {steps!r:.80}")
        for i, (_, obj) in enumerate(self.weighted):
            obj.load_state_dict(state.get(str(i), {}))
        self.steps_done = int(steps)

    def close(self) -> None:
        """Remove the embedding hook from the model."""
        if self.tap is not None:
            self.tap.remove()
            self.tap = None
