"""``harden.objective_contract``: :func:`check_objective`, the contract every objective keeps (re-exported by :mod:`harden.testing`).

A plugin's own tests call it on its class: ``check_objective(MyObjective)``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from harden.attacks.base import save_modes
from harden.checkpoint import flatten_state, unflatten_state
from harden.data import synthetic_tensors
from harden.errors import CheckpointError, PolicyError
from harden.models import Normalized
from harden.objectives import BatchContext, Objective, ObjectiveSet
from harden.policy import ThreatModel
from harden.tiny import TinyCNN, expect

__all__ = ["check_objective"]

#: the threat model :func:`check_objective` uses when given none (with a ``rho`` for IWD objectives)
_OBJECTIVE_THREAT = ThreatModel(norm="linf", eps=0.1, rho=2e-3)


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and set(a) == set(b) and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_same_state(u, v) for u, v in zip(a, b, strict=True))
        )
    return bool(a == b or (a != a and b != b))  # NaN equals NaN here


def _objective_pass(
    cls: type[Objective], threat: ThreatModel, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int
) -> tuple[Objective, BatchContext, torch.Tensor, dict[str, torch.Tensor | None]]:
    """One training step's calls, as the trainer makes them: setup, begin_epoch, loss, backward, after_step."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    obj = cls(dict(cls.example_params), threat)
    objs = ObjectiveSet(model, [(1.0, obj)], x[:1])
    try:
        objs.begin_epoch(0, lambda: [(x, y)])
        ctx = objs.context(x, y, threat)
        loss = obj.loss(ctx)
        expect(
            isinstance(loss, torch.Tensor) and loss.shape == () and loss.requires_grad,
            f"{cls.name}: expected loss() to return a scalar tensor with a gradient, "
            f"got {getattr(loss, 'shape', type(loss).__name__)}",
        )
        loss.backward()
        objs.after_step(ctx)
    finally:
        objs.close()
    return obj, ctx, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def check_objective(
    cls: type[Objective],
    threat: ThreatModel | None = None,
    *,
    model: nn.Module | None = None,
    input_shape: tuple[int, int, int, int] = (8, 1, 8, 8),
) -> None:
    """Check that a training objective class keeps the contract every harden objective keeps.

    ``cls`` is built with ``cls.example_params`` (keep them cheap: a few attack steps) and run
    as the trainer runs it (:class:`~harden.objectives.base.ObjectiveSet` setup,
    ``begin_epoch(0)``, ``loss``, ``backward``, ``after_step``) on a 3-class model in train
    mode and a batch of synthetic images. Checked:

    - the loss is a finite scalar > 0, and its gradient reaches every parameter of the model
      (finite, not all zero);
    - the model's modes are left as they were (train mode);
    - the same torch seed gives the same loss and the same gradients;
    - the views the objective declares in :meth:`~harden.objectives.base.Objective.views` are
      the views it reads, each computed once;
    - ``state_dict()`` goes through a checkpoint (tensors and JSON) and ``load_state_dict()``
      restores it in a fresh instance;
    - unknown parameters raise :class:`harden.PolicyError` naming them.

    The caller's model is not modified (the checks run on copies) and the caller's torch RNG
    state is left as it was.

    Args:
        cls: the objective class (a subclass of :class:`harden.Objective`).
        threat: the policy's threat model; None: ``linf`` eps 0.1 with ``rho`` 2e-3.
        model: a 3-class classifier for ``input_shape``'s images, in train mode; None: a
            :class:`harden.Normalized` :class:`TinyCNN`.
        input_shape: the batch's shape ``(N, C, H, W)``.

    Raises:
        AssertionError: a broken part of the contract, named with the objective.

    Example:
        >>> from harden.objectives.ce import CE
        >>> check_objective(CE)
    """
    expect(
        isinstance(cls, type) and issubclass(cls, Objective),
        f"expected a subclass of harden.Objective, got {cls!r}",
    )
    threat = _OBJECTIVE_THREAT if threat is None else threat
    name = cls.name or cls.__name__
    n, channels, size, _ = input_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = Normalized(TinyCNN(num_classes=3, in_chans=channels)).train() if model is None else model
        x, y = synthetic_tensors(n, num_classes=3, size=size, channels=channels)

        _check_unknown_params(cls, threat, name)
        obj, second = _check_one_pass(cls, threat, base, x, y, name)
        _check_state_round_trip(cls, threat, obj, second, x, name)


def _check_unknown_params(cls: type[Objective], threat: ThreatModel, name: str) -> None:
    """Unknown parameters raise a PolicyError naming them."""
    try:
        cls({"no_such_param": 1}, threat)
    except PolicyError as exc:
        expect("no_such_param" in str(exc), f"{name}: expected the PolicyError to name no_such_param, got {exc}")
    else:
        raise AssertionError(f"{name}: expected a PolicyError for an unknown parameter, got none")


def _check_one_pass(
    cls: type[Objective], threat: ThreatModel, base: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str
) -> tuple[Objective, nn.Module]:
    """One training pass: a finite loss and gradients, modes kept, views as declared, seeded; returns the objective and a second copy."""
    first = copy.deepcopy(base)
    modes = save_modes(first)
    obj, ctx, loss, grads = _objective_pass(cls, threat, first, x, y, seed=0)
    expect(bool(torch.isfinite(loss)), f"{name}: expected a finite loss, got {float(loss)}")
    expect(float(loss) > 0, f"{name}: expected a loss > 0 on an untrained model, got {float(loss)}")
    for pname, grad in grads.items():
        if grad is None:
            raise AssertionError(f"{name}: expected a gradient to reach every parameter, got none on {pname}")
        expect(bool(torch.isfinite(grad).all()), f"{name}: expected finite gradients, got NaN or inf on {pname}")
    expect(
        any(float(g.abs().sum()) > 0 for g in grads.values() if g is not None),
        f"{name}: expected a non-zero gradient on the model's parameters, got zeros",
    )
    expect(
        save_modes(first) == modes,
        f"{name}: expected the model's modes left as they were (train mode), got some changed",
    )
    expect(
        set(ctx._views) == set(obj.views()),
        f"{name}: expected the views read to be the views declared {sorted(map(str, obj.views()))}, "
        f"got {sorted(map(str, ctx._views))}",
    )
    expect(
        ctx.view_calls == len(obj.views()),
        f"{name}: expected each declared view computed once ({len(obj.views())}), got {ctx.view_calls} attacks",
    )

    second = copy.deepcopy(base)
    _, _, loss2, grads2 = _objective_pass(cls, threat, second, x, y, seed=0)
    expect(
        torch.equal(loss, loss2),
        f"{name}: expected the same loss under the same torch seed, got {float(loss)} and {float(loss2)}",
    )
    expect(
        all(_same_state(g, grads2[k]) for k, g in grads.items()),
        f"{name}: expected the same gradients under the same torch seed, got others",
    )
    return obj, second


def _check_state_round_trip(
    cls: type[Objective], threat: ThreatModel, obj: Objective, model: nn.Module, x: torch.Tensor, name: str
) -> None:
    """``state_dict()`` survives a checkpoint (tensors + JSON) and ``load_state_dict`` restores it."""
    state = obj.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = json.loads(json.dumps(flatten_state(state, "objective", tensors)))
    except (CheckpointError, TypeError, ValueError) as exc:
        raise AssertionError(f"{name}: expected a state_dict() a checkpoint can hold, got: {exc}") from exc
    fresh = cls(dict(cls.example_params), threat)
    objs = ObjectiveSet(model, [(1.0, fresh)], x[:1])
    try:
        fresh.load_state_dict(unflatten_state(tree, tensors))
    finally:
        objs.close()
    expect(
        _same_state(fresh.state_dict(), state),
        f"{name}: expected load_state_dict(state_dict()) to restore the state, got another state_dict()",
    )
