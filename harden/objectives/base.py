"""The objective contract and the per-batch context that shares adversarial views.

An objective declares the perturbed views it needs (:meth:`Objective.views`) and computes its
loss from a :class:`BatchContext`. The context computes each view once per batch and caches
the model's logits on it, so ``pgd_at + trades + ...`` never attacks or forwards twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from harden.errors import PolicyError
from harden.policy import AttackSpec, ThreatModel
from harden.registry import Registry

__all__ = ["OBJECTIVES", "BatchContext", "Objective", "ObjectiveParams", "View"]


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


class BatchContext:
    """Everything objectives share for one batch: inputs, views and cached logits.

    Args:
        model: the model being trained (in train mode).
        x: clean pixels in [0, 1].
        y: labels.
        threat: the policy's threat model.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> None:
        self.model = model
        self.x = x
        self.y = y
        self.threat = threat
        self._views: dict[View, torch.Tensor] = {}
        self._logits: dict[View | None, torch.Tensor] = {}
        self.view_calls = 0  # attacks actually run (for tests and profiling)

    def view(self, view: View) -> torch.Tensor:
        """The perturbed inputs for ``view``, computed on first request (no grad to params)."""
        if view not in self._views:
            from harden.attacks.suite import build_attack

            attack = build_attack(AttackSpec(name=view.attack, params=dict(view.params)), self.threat)
            self._views[view] = attack(self.model, self.x, self.y)
            self.view_calls += 1
        return self._views[view]

    def logits(self, view: View | None = None) -> torch.Tensor:
        """Model logits (with grad) on the clean batch (``None``) or on ``view``, cached."""
        if view not in self._logits:
            inputs = self.x if view is None else self.view(view)
            self._logits[view] = self.model(inputs)
        return self._logits[view]


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

    @abstractmethod
    def loss(self, ctx: BatchContext) -> torch.Tensor:
        """The scalar loss for the batch in ``ctx`` (differentiable w.r.t. the model)."""
