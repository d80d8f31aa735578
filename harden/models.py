"""Model adapters: timm by name, ``module:attr``, or an ``nn.Module``; normalization inside.

Every model harden trains, attacks or exports is a :class:`Normalized` wrapper, so attacks,
checks and the ONNX graph all take pixels in [0, 1] and the mean/std live in the weights.
Pretrained weights files are read by :mod:`harden.weights` (:func:`load_weights`, re-exported here).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from harden.errors import ModelError, UnknownNameError
from harden.registry import did_you_mean, suggest
from harden.weights import load_weights

__all__ = [
    "Normalized",
    "build_model",
    "check_model",
    "check_timm_name",
    "has_state",
    "import_object",
    "load_weights",
    "model_device",
    "prepare_model",
]


class Normalized(nn.Module):
    """Wrap a classifier so that it takes pixels in [0, 1] and normalizes internally.

    Args:
        model: the classifier (logits out).
        mean: per-channel mean, or None for no normalization.
        std: per-channel std, or None for no normalization.

    Example:
        >>> net = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), mean=(0.5,), std=(0.25,))
        >>> net(torch.full((1, 1, 2, 2), 0.5)).shape
        torch.Size([1, 2])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ModelError("expected both mean and std, or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ModelError(f"expected mean and std of equal length, got {len(mean)} and {len(std)}")
            if any(s <= 0 for s in std):
                raise ModelError(f"expected every std > 0, got {list(std)}")
        self.model = model
        self.has_norm = mean is not None
        m = torch.tensor(mean if mean is not None else [0.0], dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    @property
    def mean_values(self) -> tuple[float, ...] | None:
        """The per-channel mean, or None without normalization."""
        return tuple(float(v) for v in self.mean.flatten()) if self.has_norm else None

    @property
    def std_values(self) -> tuple[float, ...] | None:
        """The per-channel std, or None without normalization."""
        return tuple(float(v) for v in self.std.flatten()) if self.has_norm else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels to the wrapped model's input space."""
        if not self.has_norm:
            return x
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for pixels ``x`` in [0, 1], NCHW."""
        return self.model(self.normalize(x))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither).

    Example:
        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def has_state(model: nn.Module) -> bool:
    """Whether the model has a parameter or buffer (so :func:`model_device` reads a real device)."""
    return any(True for _ in model.parameters()) or any(True for _ in model.buffers())


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def check_timm_name(name: str) -> None:
    """Raise :class:`UnknownNameError` (with close matches) if timm has no model ``name``.

    Example:
        >>> check_timm_name("resnet10t")
        >>> check_timm_name("resnet10x")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        harden.errors.UnknownNameError: expected a timm model name, got 'resnet10x'; did you mean ...
    """
    names = _timm_names()
    if name in names:
        return
    raise UnknownNameError(
        f"expected a timm model name, got {name!r}{did_you_mean(name, names)}",
        name=name,
        suggestions=suggest(name, names),
    )


def import_object(spec: str) -> object:
    """Import ``package.module:attr`` (attr may be dotted) and return the object.

    Example:
        >>> import_object("harden.testing:TinyCNN").__name__
        'TinyCNN'
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"expected 'package.module:attr', got {spec!r}")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"expected an importable module {module_name!r} (from {spec!r}), got {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"expected {module_name!r} to define {attr!r} (from {spec!r}), got no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _factory_args(factory: object, num_classes: int, in_chans: int, args: dict[str, object]) -> dict[str, object]:
    """Pass ``num_classes``/``in_chans`` to a user factory only if its signature takes them."""
    try:
        params = inspect.signature(factory).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return args
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if key not in args and (key in params or takes_any):
            args[key] = value
    return args


def _timm_norm(model: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == in_chans:
        return mean, std
    if in_chans == 1:  # timm sums RGB filters into one channel; use the channel average
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return None


def build_model(spec: object, num_classes: int, in_chans: int) -> Normalized:
    """Build the model a policy names, wrapped in :class:`Normalized`.

    Args:
        spec: a :class:`harden.policy.ModelSpec`.
        num_classes: classes in the data (used unless the spec sets ``num_classes``).
        in_chans: channels in the data (used unless the spec sets ``in_chans``).

    Example:
        >>> from harden.policy import ModelSpec
        >>> net = build_model(ModelSpec(name="harden.testing:TinyCNN"), num_classes=3, in_chans=1)
        >>> net(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """
    from harden.policy import ModelSpec

    if not isinstance(spec, ModelSpec):
        raise ModelError(f"expected a ModelSpec, got {type(spec).__name__}")
    n_cls = spec.num_classes or num_classes
    chans = spec.in_chans or in_chans
    if spec.num_classes is not None and spec.num_classes != num_classes:
        raise ModelError(
            f"expected model.num_classes to match the data's {num_classes} classes, got {spec.num_classes}"
        )
    if spec.in_chans is not None and spec.in_chans != in_chans:
        raise ModelError(f"expected model.in_chans to match the data's {in_chans} channels, got {spec.in_chans}")
    net: nn.Module
    if spec.name.startswith("timm:"):
        import timm

        check_timm_name(spec.name[5:])
        try:
            net = timm.create_model(
                spec.name[5:], pretrained=False, num_classes=n_cls, in_chans=chans, **dict[str, Any](spec.args)
            )
        except TypeError as exc:
            raise ModelError(f"expected arguments timm accepts for {spec.name!r}, got {exc}") from None
    else:
        obj = import_object(spec.name)
        if isinstance(obj, nn.Module):
            net = obj
        elif callable(obj):
            made = obj(**_factory_args(obj, n_cls, chans, dict(spec.args)))
            if not isinstance(made, nn.Module):
                raise ModelError(f"expected {spec.name!r} to return an nn.Module, got {type(made).__name__}")
            net = made
        else:
            raise ModelError(f"expected {spec.name!r} to be an nn.Module or a callable, got {type(obj).__name__}")
    if spec.pretrained_file:
        load_weights(net, spec.pretrained_file)
    mean, std = spec.mean, spec.std
    if mean is None and spec.pretrained_file and spec.name.startswith("timm:"):
        found = _timm_norm(net, chans)
        if found:
            mean, std = found
    return Normalized(net, mean, std)


def prepare_model(model: nn.Module, spec: object | None = None) -> Normalized:
    """Wrap a user's ``nn.Module`` in :class:`Normalized` (mean/std from ``spec`` if set).

    A model that is already ``Normalized`` is returned as it is.

    Example:
        >>> prepare_model(nn.Linear(2, 2)).has_norm
        False
    """
    if isinstance(model, Normalized):
        return model
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    mean = getattr(spec, "mean", None)
    std = getattr(spec, "std", None)
    return Normalized(model, mean, std)


def check_model(model: nn.Module, example: torch.Tensor, num_classes: int | None = None) -> int:
    """Run one eval-mode forward on ``example`` and check the model gives logits.

    The forward runs under ``no_grad`` with every module in eval mode (restored afterwards), so
    it moves no BatchNorm statistics and, for a deterministic model, draws no random numbers.

    Args:
        model: the model, on ``example``'s device.
        example: a batch of training images (NCHW pixels in [0, 1]).
        num_classes: the classes of the data, if known.

    Returns:
        The number of logits per image.

    Raises:
        ModelError: the model fails on the batch (e.g. it expects another channel count), or its
            output is not ``(N, C)`` logits with ``C >= 2`` (and ``C >= num_classes`` when given).

    Warns:
        RuntimeWarning: the outputs look like probabilities (rows non-negative, summing to 1).

    Example:
        >>> from harden.testing import TinyCNN
        >>> check_model(TinyCNN(num_classes=3, in_chans=1), torch.rand(2, 1, 8, 8), num_classes=3)
        3
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    shape = tuple(example.shape)
    try:
        with torch.no_grad():
            out = model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"expected a model that accepts the data's images (a batch of shape {shape}), got {type(exc).__name__}: "
            f"{first}; check model.in_chans and the image size"
        ) from None
    finally:
        for module, training in modes.items():
            module.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"expected logits of shape ({shape[0]}, classes) from the model, got {got}")
    classes = int(out.shape[1])
    if classes < max(2, num_classes or 0):  # fewer logits than classes: labels out of the model's range
        want = f"at least {num_classes} (the data's classes)" if (num_classes or 0) >= 2 else "at least 2"
        raise ModelError(f"expected {want} logits per image from the model, got {classes}")
    sums = out.float().sum(1)
    if bool((out >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        warnings.warn(
            "expected logits from the model, got probabilities (every output row is non-negative and sums to 1: "
            "the model ends in softmax); drop the final softmax: cross-entropy on probabilities saturates and "
            "masks gradients, and verify's check logits_not_probabilities will fail",
            RuntimeWarning,
            stacklevel=2,
        )
    return classes
