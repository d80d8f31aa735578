"""Weights files: read one (never downloads, never unpickles) and load it key for key.

:func:`read_state_dict` reads ``.safetensors`` or a weights-only ``.pth``/``.pt``/``.bin`` (the
format is read from the file's first bytes, so a misnamed file still loads) and refuses anything
but finite tensors. :func:`load_weights` is what ``model.pretrained_file`` does (only timm's
classifier may be skipped); :func:`match_state` finds how a file's keys map onto a model's (the
prefixes ``module.``, ``_orig_mod.`` and one Lightning attribute stripped), for
:func:`harden.model_load.load_classifier_weights`. :mod:`harden.models` re-exports :func:`load_weights`.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harden.errors import ModelError

__all__ = ["KeyMatch", "check_shapes", "load_weights", "match_state", "read_state_dict", "timm_normalization"]

_LOG = logging.getLogger("harden")

_REMEDY = "save the state_dict of the same architecture (same model.name and model.args), or drop model.pretrained_file"
#: the keys under which checkpoints nest the state dict (Lightning, common training scripts)
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
#: prefixes every key carries when the model was wrapped: DataParallel / DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SAVE_HINT = "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_safetensors(path: Path) -> bool:
    """Whether the file's bytes are safetensors (an 8-byte header length, then ``{``); else torch's format.

    The first bytes decide, not the suffix: a ``.pth`` named ``.safetensors`` (or the reverse)
    is read as what it is. A file that is neither goes by its suffix (and fails there, one line).
    """
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP) or head.startswith(_PICKLE):
        return False
    if len(head) == 9 and head[8:9] == b"{":
        return True
    return path.suffix == ".safetensors"


def _read_safetensors(path: Path, where: str) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"expected a readable safetensors file at {where}, got one safetensors cannot read ({_first_line(exc)}); "
            "the file is truncated or corrupt: save or copy it again"
        ) from None


def _read_torch(path: Path, where: str) -> Any:
    try:  # a file object, not the path: torch.load would hand a path ending in .safetensors to safetensors
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # torch's weights-only reader refused no object: the stream itself is bad
            raise ModelError(
                f"expected a weights-only state dict (torch.save of model.state_dict()) at {where}, got a file "
                "torch cannot read (not a valid pickle stream); the file is truncated or not a PyTorch checkpoint"
            ) from None
        raise ModelError(
            f"expected a weights-only state dict at {where}, got a file holding pickled Python objects (first: "
            f"{found.group(1)}), which harden will not load (loading them can run code); harden accepts a "
            f".safetensors file or a state dict of tensors: convert it where you made it with {_SAVE_HINT}"
        ) from None
    except Exception as exc:  # zip, EOF and format errors of torch's reader
        raise ModelError(
            f"expected a weights-only state dict (torch.save of model.state_dict()) at {where}, got a file "
            f"torch cannot read ({type(exc).__name__}: {_first_line(exc)}); the file is truncated or corrupt"
        ) from None


def _unwrap(state: Any) -> Any:
    """The state dict nested under ``state_dict`` / ``model_state_dict`` / ``model`` (one level), else ``state``."""
    if isinstance(state, dict):
        for key in NESTED_KEYS:
            if isinstance(state.get(key), dict):
                return state[key]
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, checked (never downloads, never unpickles objects).

    ``.safetensors``, or a weights-only ``torch.save`` file (``.pth``, ``.pt``, ``.bin``, read
    with ``torch.load(weights_only=True)``); the first bytes of the file decide which, not its
    name. A state dict nested under ``state_dict``, ``model_state_dict`` or ``model`` (Lightning
    and common training scripts) is unwrapped; other entries beside it (``epoch``, ...) are
    ignored.

    Raises:
        ModelError: no such file; a corrupt file; pickled Python objects; not a dict of tensors;
            a NaN or infinity in any tensor (one line, naming the file).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "w.pth"
        >>> torch.save({"epoch": 3, "state_dict": nn.Linear(2, 3).state_dict()}, path)
        >>> sorted(read_state_dict(path))
        ['bias', 'weight']
    """
    path = Path(path)
    where = repr(str(path))
    if not path.is_file():
        raise ModelError(f"expected a local weights file, got {where} which does not exist or is not a file")
    state = _unwrap(_read_safetensors(path, where) if _is_safetensors(path) else _read_torch(path, where))
    if not isinstance(state, dict):
        raise ModelError(f"expected a dict of tensors (a state dict) in {where}, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(
                f"expected a dict of tensors (a state dict) in {where}, got {type(value).__name__} under {key!r}; "
                "save model.state_dict()"
            )
    nonfinite = [
        k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        raise ModelError(
            f"expected finite weights in {where}, got NaN or infinity in {len(nonfinite)} tensors (first: "
            f"{nonfinite[0]!r}); the file is corrupt or the run that saved it diverged"
        )
    return dict(state)


def _classifier_keys(model: nn.Module, own: Sequence[str]) -> set[str]:
    """State-dict keys of the classifier a model names the way timm does (none for other models).

    ``model.get_classifier()`` (its tensors, wherever it sits in the model) and
    ``model.pretrained_cfg["classifier"]`` (module names, as prefixes).
    """
    keys: set[str] = set()
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    heads = [m for m in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(m, nn.Module)]
    for name, module in model.named_modules():
        if name and any(module is h for h in heads):
            keys |= {k for k in own if k.startswith(f"{name}.")}
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    for prefix in [names] if isinstance(names, str) else list(names or ()):
        keys |= {k for k in own if k == prefix or k.startswith(f"{prefix}.")}
    return keys


def _first(keys: Sequence[str], k: int = 3) -> str:
    if not keys:
        return "none"
    return ", ".join(repr(key) for key in keys[:k]) + (" ..." if len(keys) > k else "")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model`` exactly (never downloads, never unpickles).

    The file is read by :func:`read_state_dict` (``.safetensors`` or a weights-only ``.pth``;
    a nested ``{"state_dict": ...}`` is unwrapped). Every key must match the model's, with its shape, and every value must be finite. The one
    exception is the classifier, as a timm model names it (``get_classifier()`` or
    ``pretrained_cfg["classifier"]``): when its shape differs (ImageNet's 1000 classes into a
    10-class model) it is skipped and keeps its fresh initialization, with a ``UserWarning``.
    One INFO line on the ``harden`` logger says what was loaded. Nothing is loaded on error.

    Raises:
        ModelError: no such file; a corrupt file; pickled objects; not a dict of tensors; missing,
            unexpected or mis-shaped tensors (other than the classifier's); NaN or infinity.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file(nn.Linear(2, 3).state_dict(), str(path))
        >>> net = nn.Linear(2, 3)
        >>> load_weights(net, path)
        >>> load_weights(nn.Linear(2, 4), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        harden.errors.ModelError: expected weights matching the model in '...', got 0 missing, 0 unexpected and 2 ...
    """
    path = Path(path)
    state = read_state_dict(path)
    own = model.state_dict()
    heads = _classifier_keys(model, list(own))
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    misshaped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    # the classifier's tensors may differ in their class dimension (the first) only
    skipped = [k for k in misshaped if k in heads and state[k].shape[1:] == own[k].shape[1:]]
    bad_shape = [k for k in misshaped if k not in skipped]
    if missing or unexpected or bad_shape:
        shapes = "".join(
            f"; {k!r} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in bad_shape[:1]
        )
        raise ModelError(
            f"expected weights matching the model in {str(path)!r}, got {len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(bad_shape)} mis-shaped tensors (first: {_first(missing + unexpected + bad_shape)})"
            f"{shapes}; {_REMEDY}"
        )
    keep = {k: v for k, v in state.items() if k not in skipped}
    try:
        model.load_state_dict(keep, strict=False)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["RuntimeError"])[0]
        raise ModelError(f"expected weights the model can take in {str(path)!r}, got {first}; {_REMEDY}") from None
    line = f"loaded {len(keep)} of {len(own)} tensors from {str(path)!r}"
    if skipped:
        before, after = state[skipped[0]].shape[0], own[skipped[0]].shape[0]
        line += f"; skipped the classifier {', '.join(skipped)} (shape differs: {before} → {after} classes)"
        warnings.warn(line + ": it starts from random weights", UserWarning, stacklevel=2)
    _LOG.info(line)


@dataclass(frozen=True)
class KeyMatch:
    """How a file's keys map onto a model's (:func:`match_state`).

    Attributes:
        target: the name of the key set that matched (a key of ``targets``).
        state: the file's tensors under the model's keys.
        stripped: the prefix removed from every key (``""``: none), e.g. ``"module."`` or ``"net."``.
    """

    target: str
    state: dict[str, torch.Tensor]
    stripped: str


def _strip_wrappers(prefix: str, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Remove ``module.`` / ``_orig_mod.`` while every key carries one."""
    changed = True
    while changed and state:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in state):
                state, prefix, changed = {k[len(p) :]: v for k, v in state.items()}, prefix + p, True
    return prefix, state


def _variants(
    state: dict[str, torch.Tensor],
) -> tuple[list[tuple[str, dict[str, torch.Tensor]]], list[tuple[str, dict[str, torch.Tensor]]]]:
    """The whole file (as it is, without wrapper prefixes), and the keys under each top-level attribute."""
    prefix, bare = _strip_wrappers("", state)
    whole = [("", state)] + ([(prefix, bare)] if prefix else [])
    parts = [
        _strip_wrappers(
            f"{prefix}{attr}.", {k[len(attr) + 1 :]: v for k, v in bare.items() if k.startswith(f"{attr}.")}
        )
        for attr in sorted({k.split(".", 1)[0] for k in bare if "." in k})
    ]
    return whole, parts


def match_state(
    state: dict[str, torch.Tensor], targets: Mapping[str, Collection[str]], where: str, remedy: str
) -> KeyMatch:
    """Map a file's keys exactly onto one of the model's key sets, stripping common prefixes.

    Tried in order, for each of ``targets`` (e.g. harden's wrapped keys, the inner model's): the
    keys as they are; without the prefixes every key carries from ``DataParallel``/DDP
    (``module.``) or ``torch.compile`` (``_orig_mod.``); then the keys under one top-level
    attribute (a Lightning module's ``net.``/``model.``), the rest of the file ignored. The
    keys must match exactly; an attribute match must be the only one.

    Raises:
        ModelError: no exact match (one line: how many keys are missing and unexpected, a few of
            each, and ``remedy``), or several attributes that match.

    Example:
        >>> state = {"module.weight": torch.zeros(1), "module.bias": torch.zeros(1)}
        >>> m = match_state(state, {"plain": ["weight", "bias"]}, "'w.pth'", "")
        >>> m.target, m.stripped, sorted(m.state)
        ('plain', 'module.', ['bias', 'weight'])
    """
    wants = {name: set(keys) for name, keys in targets.items()}
    whole, parts = _variants(state)
    for prefix, keys in whole:
        for name, want in wants.items():
            if set(keys) == want:
                return KeyMatch(name, keys, prefix)
    found = [
        KeyMatch(name, keys, prefix) for prefix, keys in parts for name, want in wants.items() if set(keys) == want
    ]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(repr(m.stripped) for m in found)
        raise ModelError(
            f"expected one model's weights in {where}, got several that fit (under {names}); save the state_dict "
            "of the one to load"
        )
    best: tuple[int, int, set[str], set[str]] = (-1, 0, set(), set())
    for _, keys in whole + parts:  # the nearest key set: most keys in common, then fewest differences
        for want in wants.values():
            have = set(keys)
            score = (len(have & want), -len(have ^ want))
            if score > best[:2]:
                best = (*score, want - have, have - want)
    missing, unexpected = best[2], best[3]
    raise ModelError(
        f"expected the model's keys in {where}, got {len(missing)} missing (first: {_first(sorted(missing))}) and "
        f"{len(unexpected)} unexpected (first: {_first(sorted(unexpected))}); {remedy}"
    )


def check_shapes(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], where: str, remedy: str) -> None:
    """Raise a one-line :class:`ModelError` naming the first tensor whose shape differs from the model's.

    Example:
        >>> check_shapes({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, "'w.pth'", "fix it")
        Traceback (most recent call last):
        ...
        harden.errors.ModelError: expected tensors shaped as the model's in 'w.pth', got 1 mis-shaped (first: 'w' is (2,) in the file, (3,) in the model); fix it
    """
    bad = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if bad:
        k = bad[0]
        raise ModelError(
            f"expected tensors shaped as the model's in {where}, got {len(bad)} mis-shaped (first: {k!r} is "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model); {remedy}"
        )


def timm_normalization(model: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std of a timm model's ``pretrained_cfg`` for ``in_chans`` channels (None: it names none).

    For one channel, the average of timm's RGB statistics (timm sums RGB filters into one
    channel). harden never applies these on its own: :func:`harden.model_load.build_model` names them
    in a warning.

    Example:
        >>> class Cfg(nn.Module):
        ...     pretrained_cfg = {"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.2, 0.2)}
        >>> timm_normalization(Cfg(), 3), timm_normalization(Cfg(), 2)
        (((0.4, 0.5, 0.6), (0.2, 0.2, 0.2)), None)
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or cfg.get("mean") is None or cfg.get("std") is None:
        return None
    try:
        mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    except (TypeError, ValueError):
        return None
    if len(mean) == in_chans and len(std) == in_chans:
        return mean, std
    if in_chans == 1 and mean and std:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return None
