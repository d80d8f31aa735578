"""One call to attack a model with any registered attack: :func:`attack`.

The same attacks :func:`harden.verify` runs (``pgd``, ``apgd_ce``, ``apgd_t``, ``fgsm``,
``square``, ``fab_t``, ...; the list is ``harden.ATTACKS.names()``), with their parameters
validated, the threat model enforced on the result, the caller's RNG and the model's modes left
as they were. For robust accuracy on a whole test set, with the worst case over a suite of
attacks, use :func:`harden.verify` or :func:`harden.evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import ValidationError
from torch import nn

from harden.attacks import ATTACKS
from harden.attacks.base import Attack, AttackEnv
from harden.batches import check_labels, check_pixels
from harden.errors import DataError, InputError, ModelError, PolicyError, ThreatModelError, format_validation_error
from harden.models import Normalized, check_model, has_state, model_device, prepare_model
from harden.policy import ThreatModel

__all__ = ["attack"]


def attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    params: Mapping[str, object] | None = None,
    seed: int = 0,
    surrogate: nn.Module | None = None,
) -> torch.Tensor:
    """Adversarial inputs for ``(x, y)`` from the registered attack ``name``.

    The attack runs with the model in eval mode (every submodule's mode is restored afterwards)
    and its random draws seeded by ``seed`` (your RNG state is left as it was). The result is
    projected onto the ``norm`` ball of radius ``eps`` around ``x`` and onto [0, 1]; attacks
    outside the l_p threat model (``iwd``, ``invariance``) are only clipped to [0, 1], and
    ``invariance_examples`` changes the true label (see ``docs/verification.md``).

    Args:
        name: a registered attack (``harden.ATTACKS.names()``), e.g. ``"apgd_ce"``.
        model: the classifier (logits out) taking pixels in [0, 1]: a plain ``nn.Module`` (no
            normalization is added: fold yours into the model, or pass a
            :class:`~harden.models.Normalized`), on ``x``'s device.
        x: clean pixels, float32 NCHW in [0, 1], on the model's device.
        y: the true labels, one integer per image, on ``x``'s device.
        eps: the radius of the threat model (e.g. ``8 / 255`` for linf).
        norm: ``linf`` or ``l2``.
        params: the attack's parameters (its ``Params``; see docs/policy-reference.md), e.g.
            ``{"steps": 20, "restarts": 2}`` for ``pgd``. None: its defaults.
        seed: the seed of the attack's random draws (random starts, queries).
        surrogate: the ``transfer`` attack's surrogate model (trained on your data), on its own
            device; ignored by the other attacks.

    Returns:
        The adversarial inputs: a tensor like ``x`` (same shape, device, dtype), detached.

    Raises:
        UnknownNameError: no attack of that name (with the closest names).
        PolicyError: a parameter is unknown or invalid.
        ThreatModelError: ``eps`` or ``norm`` is invalid.
        InputError: ``x`` is not float32 NCHW pixels in [0, 1], ``y`` not one label per image in
            the model's classes, or the model, ``x`` and ``y`` are not on one device.
        ModelError: ``model`` is not an ``nn.Module`` giving ``(N, C)`` logits.
        DataError: the attack needs something not given (``transfer`` without a ``surrogate``).

    Example:
        >>> from harden.testing import TinyCNN, synthetic_tensors
        >>> model, (x, y) = TinyCNN(num_classes=3), synthetic_tensors(8, seed=1)
        >>> x_adv = attack("pgd", model, x, y, eps=0.1, params={"steps": 3})
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), x_adv.shape == x.shape
        (True, True)
    """
    cls = _attack_class(name)
    threat = _threat(eps, norm)
    if params is not None and not isinstance(params, Mapping):
        raise PolicyError(
            f"{name} params: expected a mapping of parameter names to values, got {type(params).__name__}"
        )
    atk = cls(threat, dict(params or {}))  # validated by the attack's Params: a one-line PolicyError
    net = _wrapped(model, x)
    _check_inputs(net, x, y)
    if surrogate is not None and hasattr(atk, "surrogate"):
        atk.surrogate = surrogate
    atk.prepare(AttackEnv(policy=None, bundle=None, device=x.device))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return atk(net, x, y)


def _attack_class(name: str) -> type[Attack]:
    if not isinstance(name, str):
        raise PolicyError(f"expected an attack name (a string, e.g. 'pgd'), got {type(name).__name__}")
    return ATTACKS.get(name)  # an unknown name: UnknownNameError with "did you mean ..."


def _threat(eps: float, norm: str) -> ThreatModel:
    try:
        return ThreatModel(norm=norm, eps=eps)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ThreatModelError(format_validation_error(exc, "threat model")) from None


def _wrapped(model: nn.Module, x: object) -> Normalized:
    """The model as a :class:`Normalized` (none added to a plain module), the wrapper's buffers beside it."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    net = prepare_model(model)
    if net is not model:  # our wrapper's unused mean/std follow the model (nothing of the user's moves)
        where = model_device(model) if has_state(model) else getattr(x, "device", torch.device("cpu"))
        net.mean, net.std = net.mean.to(where), net.std.to(where)
    return net


def _check_inputs(net: Normalized, x: torch.Tensor, y: torch.Tensor) -> None:
    """The attack's inputs, with one-line :class:`InputError` s (the attack re-checks the pixels)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected x as a torch tensor of pixels, got {type(x).__name__}")
    check_pixels(x, float32=True, where="x: ")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(
            f"expected y as {x.shape[0]} labels (one per image), got {getattr(y, 'shape', type(y).__name__)}"
        )
    if y.device != x.device:
        raise InputError(f"expected x and y on one device, got {x.device} and {y.device}")
    if has_state(net) and model_device(net) != x.device:
        raise InputError(
            f"expected the model and x on one device, got {model_device(net)} and {x.device}; move one of them"
        )
    n_logits = check_model(net, x[:1])  # (N, C) logits, the channels: one-line ModelError
    try:
        check_labels(y, n_logits, where="y: ")
    except DataError as exc:
        raise InputError(str(exc)) from None
