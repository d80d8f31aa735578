"""The objective contract and the set of weighted objectives a policy trains on.

An objective declares the perturbed views it needs (:meth:`Objective.views`) and computes its
loss from a :class:`BatchContext` (see :mod:`harden.objectives.context`, whose public names are
re-exported here). The context computes each view once per batch and caches the model's logits
on it, so ``pgd_at + trades + ...`` never attacks or forwards twice; :class:`ObjectiveSet`
builds each view's attack once per run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from harden.errors import CheckpointError, PolicyError
from harden.objectives.context import (
    ATTACK_PRECISIONS,
    BN_STATS,
    BatchContext,
    Batches,
    View,
    build_view_attack,
    frozen_bn_statistics,
    pgd_view,
)
from harden.objectives.embedding import EmbeddingTap
from harden.policy import ThreatModel
from harden.registry import Registry

if TYPE_CHECKING:
    from harden.attacks.base import Attack

__all__ = [
    "ATTACK_PRECISIONS",
    "BN_STATS",
    "OBJECTIVES",
    "BatchContext",
    "Batches",
    "Objective",
    "ObjectiveParams",
    "ObjectiveSet",
    "View",
    "build_view_attack",
    "frozen_bn_statistics",
    "pgd_view",
]


class ObjectiveParams(BaseModel):
    """Base of every objective's parameters (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    #: cheap params for :func:`harden.testing.check_objective` (a few attack steps)
    example_params: ClassVar[dict[str, Any]] = {}
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
    clean input that requires grad (double backprop), each objective's :meth:`Objective.setup`,
    and the attack of every view the objectives declare (:meth:`attacks`, built on the first
    batch and shared by every batch's context after it).

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
        >>> float(objs.loss(objs.context(x, y, ThreatModel()))[0].detach()) > 0
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
        self._attacks: dict[View, Attack] = {}
        self._attacks_threat: ThreatModel | None = None

    def attacks(self, threat: ThreatModel) -> dict[View, Attack]:
        """The attack of every view the objectives declare under ``threat``, built once.

        The same dict (and the same attack objects) is returned on every call with an equal
        threat model; contexts add views no objective declared to it on first use. A different
        threat model starts a new dict.

        Example:
            >>> from harden.testing import TinyCNN
            >>> x, threat = torch.rand(2, 1, 8, 8), ThreatModel(eps=0.1)
            >>> objs = ObjectiveSet(TinyCNN(num_classes=3), [(1.0, OBJECTIVES.get("pgd_at")({"steps": 2}, threat))], x)
            >>> list(objs.attacks(threat)) == [pgd_view(2)], objs.attacks(threat) is objs.attacks(threat)
            (True, True)
        """
        if self._attacks_threat is None or (self._attacks_threat is not threat and self._attacks_threat != threat):
            views = dict.fromkeys(v for _, obj in self.weighted for v in obj.views())  # first-asked order
            self._attacks = {view: build_view_attack(view, threat) for view in views}
            self._attacks_threat = threat
        return self._attacks

    def context(self, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> BatchContext:
        """A fresh per-batch context with what these objectives need (and the run's attacks)."""
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
            attacks=self.attacks(threat),
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
