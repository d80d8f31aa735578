"""Loading models: timm by name, ``package.module:attr``, weights files, the model to evaluate.

:func:`build_model` builds the model a policy names (a timm name, checked by
:func:`check_timm_name`, or code imported by :func:`import_object`, which refuses anything not
defined in the package it names), wrapped in :class:`harden.models.Normalized`;
:func:`load_classifier_weights` loads a plain or harden-wrapped state dict exactly and
:func:`load_model` builds or wraps a model to evaluate. The normalization is only ever what the
policy or the caller states, never taken silently from a weights file or timm.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harden.coderef import MODULE_ATTR
from harden.errors import HardenError, ModelError, UnknownNameError
from harden.models import Normalized, _values
from harden.registry import did_you_mean, suggest
from harden.weights import check_shapes, load_weights, match_state, read_state_dict, timm_normalization

_LOG = logging.getLogger("harden")

__all__ = [
    "build_model",
    "check_timm_name",
    "import_object",
    "load_classifier_weights",
    "load_model",
]


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

    The normalization is the spec's ``mean``/``std`` and nothing else: with ``pretrained_file``
    and no ``mean``/``std``, a timm model's pretrained-config mean/std are named in a
    ``UserWarning`` (how to apply them), never applied. ``spec.output`` reads the logits.

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
        if spec.mean is None and spec.name.startswith("timm:"):
            _warn_timm_normalization(spec.name, net, chans)
    return Normalized(net, spec.mean, spec.std, spec.output)


def _warn_timm_normalization(name: str, net: nn.Module, chans: int) -> None:
    """Name timm's pretrained-config mean/std (not applied) for a ``pretrained_file`` without ``model.mean``/``std``."""
    found = timm_normalization(net, chans)
    if found is None:
        return
    mean, std = (", ".join(f"{v:.6g}" for v in vs) for vs in found)
    warnings.warn(
        f"model.pretrained_file: harden applies no normalization (model.mean/model.std are not set), but timm's "
        f"pretrained config of {name!r} normalizes with mean ({mean}), std ({std}); if the weights were trained "
        f"with it, set model.mean: [{mean}] and model.std: [{std}] (or --mean/--std)",
        UserWarning,
        stacklevel=3,
    )


_WEIGHTS_REMEDY = (
    "save the state_dict of the same architecture as the model (same name, classes, channels and args), "
    "with or without harden's wrapper"
)


def _check_file_normalization(net: Normalized, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse harden-wrapped weights whose ``mean``/``std`` differ from the model's (never changed silently).

    A file without normalization (mean 0, std 1) fits a model without; its buffers are replaced
    by the model's own, so their shape does not matter.
    """
    fm, fs = state["mean"].float(), state["std"].float()
    identity = bool((fm == 0).all()) and bool((fs == 1).all())
    if identity and not net.has_norm:
        state["mean"], state["std"] = net.mean.detach().clone(), net.std.detach().clone()
        return
    same = (
        not identity
        and net.has_norm
        and fm.shape == net.mean.shape
        and fs.shape == net.std.shape
        and bool(torch.allclose(fm, net.mean.float(), rtol=0.0, atol=1e-6))
        and bool(torch.allclose(fs, net.std.float(), rtol=0.0, atol=1e-6))
    )
    if same:
        return
    file_norm = "none" if identity else f"mean {_values(fm.flatten().tolist())}, std {_values(fs.flatten().tolist())}"
    if identity:
        remedy = "evaluate it without mean/std (drop --mean/--std and model.mean/model.std)"
    else:
        m, s = (" ".join(f"{v:.7g}" for v in t.flatten().tolist()) for t in (fm, fs))
        remedy = f"state the file's: --mean {m} --std {s} (or model.mean/model.std in the policy)"
    raise ModelError(
        f"expected the normalization in {where} to match the model's, got {file_norm} in the file and "
        f"{net.describe_normalization()} for the model; harden never changes it silently: {remedy}"
    )


def load_classifier_weights(net: Normalized, path: str | Path) -> None:
    """Load a classifier's weights file into ``net`` exactly: harden's wrapped keys or the inner model's.

    The file (``.safetensors`` or a weights-only ``.pth``/``.pt``/``.bin``,
    :func:`harden.weights.read_state_dict`) holds either harden's keys (``model.*`` with the
    ``mean``/``std`` buffers, as ``harden fit`` writes) or the plain ``state_dict()`` of the inner
    model; the prefixes of ``DataParallel``/DDP (``module.``), ``torch.compile`` (``_orig_mod.``)
    and one Lightning attribute (``net.``, ``model.``) are stripped. Every key must match, with
    its shape (no classifier is skipped). The normalization is never changed: a harden file whose
    ``mean``/``std`` differ from ``net``'s is refused, naming both. Nothing is loaded on error;
    one INFO line on the ``harden`` logger says what was loaded.

    Raises:
        ModelError: an unreadable or unsafe file, missing / unexpected / mis-shaped tensors, or
            another normalization (one line, naming the file and the remedy).

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> src, path = TinyCNN(num_classes=3), Path(tempfile.mkdtemp()) / "plain.pth"
        >>> torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
        >>> net = Normalized(TinyCNN(num_classes=3))
        >>> load_classifier_weights(net, path)
        >>> torch.equal(net.model.head.weight, src.head.weight)
        True
    """
    if not isinstance(net, Normalized):
        raise ModelError(f"expected a harden.models.Normalized model, got {type(net).__name__}; wrap it first")
    where = repr(str(path))
    state = read_state_dict(path)
    own, inner = net.state_dict(), net.model.state_dict()
    found = match_state(state, {"harden": list(own), "plain": list(inner)}, where, _WEIGHTS_REMEDY)
    loaded = dict(found.state)
    if found.target == "harden":
        _check_file_normalization(net, loaded, where)
    target: nn.Module = net if found.target == "harden" else net.model
    check_shapes(loaded, own if found.target == "harden" else inner, where, _WEIGHTS_REMEDY)
    try:
        target.load_state_dict(loaded, strict=True)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["RuntimeError"])[0]
        raise ModelError(f"expected weights the model can take in {where}, got {first}; {_WEIGHTS_REMEDY}") from None
    how = "harden's wrapped keys" if found.target == "harden" else "a plain state_dict of the model"
    stripped = f", prefix {found.stripped!r} stripped" if found.stripped else ""
    _LOG.info("loaded %d tensors from %s (%s%s)", len(loaded), where, how, stripped)


def load_model(
    model: nn.Module | str | None,
    policy: Any,
    *,
    num_classes: int,
    in_chans: int,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    output: int | str | None = None,
) -> Normalized:
    """The model to evaluate: built or wrapped, its weights loaded exactly, in eval mode.

    Args:
        model: an ``nn.Module`` (used as it is: wrapped unless already :class:`Normalized`), a
            name (``timm:NAME`` or ``package.module:attr``: a name you pass here is your own
            opt-in, so no ``allow_code`` is needed), or None for the policy's ``model``.
            ``model.args`` apply only to the policy's own model name.
        policy: the :class:`harden.policy.Policy`; its ``model`` section gives the defaults.
        num_classes: the data's classes.
        in_chans: the data's channels.
        weights: a weights file (:func:`load_classifier_weights`); None: the policy's
            ``model.pretrained_file`` when the model is the policy's, else none.
        mean: the per-channel mean; with ``std`` it replaces the policy's ``model.mean``/``std``.
            Neither: the policy's (none when it sets none; never timm's).
        std: the per-channel std, as ``mean``.
        output: where the logits are (see :class:`Normalized`); None: the policy's ``model.output``.

    Returns:
        The :class:`Normalized` model in eval mode (a built one on the CPU); its
        :meth:`~Normalized.describe_normalization` is logged at INFO.

    Raises:
        ModelError: a bad name, weights that do not fit, or a normalization that disagrees with
            the weights file or an already wrapped model.

    Example:
        >>> from harden.testing import tiny_policy
        >>> net = load_model("harden.testing:TinyMLP", tiny_policy(), num_classes=3, in_chans=1, mean=[0.5], std=[0.2])
        >>> net.describe_normalization(), net.training
        ('mean (0.5), std (0.2)', False)
    """
    from pydantic import ValidationError

    from harden.policy import ModelSpec

    spec = getattr(policy, "model", None)
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"expected a harden.Policy, got {type(policy).__name__}")
    if (mean is None) != (std is None):
        raise ModelError("expected both mean and std, or neither")
    use_mean, use_std = (mean, std) if mean is not None else (spec.mean, spec.std)
    use_output = output if output is not None else spec.output
    if isinstance(model, Normalized):
        _same_wrapping(model, mean, std, output)
        net = model
    elif isinstance(model, nn.Module):
        net = Normalized(model, use_mean, use_std, use_output)
    elif model is None or isinstance(model, str):
        name = spec.name if model is None else model
        own = name == spec.name
        try:
            built = ModelSpec(
                name=name,
                num_classes=spec.num_classes,
                in_chans=spec.in_chans,
                mean=None if use_mean is None else tuple(use_mean),
                std=None if use_std is None else tuple(use_std),
                output=use_output,
                args=dict(spec.args) if own else {},
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ModelError(
                f"expected a model name 'timm:NAME' or 'package.module:attr', got {name!r}: {first['msg']}"
            ) from None
        weights = weights if weights is not None or not own else spec.pretrained_file
        net = build_model(built, num_classes, in_chans)
    else:
        raise ModelError(f"expected an nn.Module, 'timm:NAME' or 'package.module:attr', got {type(model).__name__}")
    if weights is not None:
        load_classifier_weights(net, weights)
    net.eval()
    _LOG.info("normalization: %s", net.describe_normalization())
    return net


def _same_wrapping(
    net: Normalized, mean: Sequence[float] | None, std: Sequence[float] | None, output: int | str | None
) -> None:
    """Refuse explicit mean/std or output that differ from an already wrapped model's (never changed silently)."""
    if mean is not None and std is not None:
        same = net.has_norm and _values(mean) == _values(net.mean_values) and _values(std) == _values(net.std_values)
        if not same:
            raise ModelError(
                f"expected mean {_values(mean)}, std {_values(std)} to match the Normalized model's, got "
                f"{net.describe_normalization()}; pass the inner model (net.model) to normalize it otherwise"
            )
    if output is not None and output != net.output:
        raise ModelError(
            f"expected output={output!r} to match the Normalized model's output={net.output!r}; pass the inner model"
        )
