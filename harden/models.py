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

from harden.coderef import MODULE_ATTR
from harden.errors import HardenError, ModelError, UnknownNameError
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


def _defined_in(obj: object) -> str | None:
    """The module an object was defined in: a class's or function's own ``__module__``, else its class's.

    An instance (an ``nn.Module``, a ``functools.partial``) reports its class's module; a module,
    a builtin without a module, or a non-string ``__module__`` gives None.
    """
    if inspect.ismodule(obj):
        return None
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        where = getattr(obj, "__module__", None)
    else:  # an instance: its class's module, never an attribute the instance itself may answer
        where = getattr(type(obj), "__module__", None)
    return where if isinstance(where, str) else None


def import_object(spec: str) -> object:
    """Import ``package.module:Name`` and return the object, which must be defined in that package.

    ``Name`` is one public name of the module (no dotted path, no leading ``_``), and code (a
    callable, an ``nn.Module``) must come from the module's top-level package: a class or function
    defined there, or an instance of a class defined there. An object the module merely imported
    from elsewhere (``os.system``, a module, a builtin) is refused before anything is called, so a
    reference allowed for ``mypkg`` never reaches code outside ``mypkg``. Plain data (neither
    callable nor a module) is returned as it is, for the caller to refuse with its own message.

    Raises:
        ModelError: a malformed reference, a module that does not import, no such name, or an
            object from another package (one line, with the remedy).

    Example:
        >>> import_object("harden.testing:TinyCNN").__name__  # defined in harden.tiny: same package
        'TinyCNN'
        >>> import_object("harden.checkpoint:os")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        harden.errors.ModelError: expected 'harden.checkpoint:os' to be defined in package 'harden', ...
    """
    if not isinstance(spec, str) or not MODULE_ATTR.fullmatch(spec):
        raise ModelError(
            f"expected 'package.module:Name' (one public name of the module, no dotted path, no leading '_'), "
            f"got {spec!r}; name the code where it is defined"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"expected an importable module {module_name!r} (from {spec!r}), got {exc}") from None
    if not hasattr(module, attr):
        raise ModelError(f"expected {module_name!r} to define {attr!r} (from {spec!r}), got no attribute {attr!r}")
    obj: object = getattr(module, attr)
    if not (callable(obj) or isinstance(obj, nn.Module) or inspect.ismodule(obj)):
        return obj  # plain data, never called: the caller refuses it with its own message
    package = module_name.partition(".")[0]
    where = _defined_in(obj)
    if where is None or (where != package and not where.startswith(f"{package}.")):
        if inspect.ismodule(obj):
            got = f"the module {getattr(obj, '__name__', attr)!r}"
        else:
            got = f"an object from {where!r}" if where else f"a {type(obj).__name__} defined in no package"
        how = (
            f"name a function of package {package!r} that builds it"
            if isinstance(obj, nn.Module)
            else "name the code where it is defined"
        )
        raise ModelError(f"expected {spec!r} to be defined in package {package!r}, got {got}; {how}")
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


def _build_failed(name: str, args: Any, exc: BaseException, who: str) -> str:
    """The one-line message for a model ``who`` (timm or the factory) could not build from ``model.args``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, KeyError) and first.startswith(("'", '"')):
        first = f"no such name {first}"
    got = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(got) > 300:
        got = got[:297] + "..."
    keys = ", ".join(sorted(str(k) for k in args)) if args else "none"
    return (
        f"model.args: expected arguments {who} accepts for {name!r} (given: {keys}), got {got}; "
        "fix or drop the offending model.args entry (names, values and sizes)"
    )


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
        except Exception as exc:  # timm checks its arguments with KeyError, AssertionError, TypeError, ...
            raise ModelError(_build_failed(spec.name, spec.args, exc, "timm")) from None
    else:
        obj = import_object(spec.name)
        if isinstance(obj, nn.Module):
            net = obj
        elif callable(obj):
            try:
                made = obj(**_factory_args(obj, n_cls, chans, dict(spec.args)))
            except HardenError:
                raise
            except Exception as exc:  # a wrong keyword (TypeError), an absurd size (RuntimeError, MemoryError), ...
                raise ModelError(_build_failed(spec.name, spec.args, exc, "the factory")) from None
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
