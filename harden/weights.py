"""Pretrained weights: read a local weights file (never downloads, never unpickles) and load it exactly.

:func:`load_weights` is what ``model.pretrained_file`` does; :mod:`harden.models` re-exports it.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harden.errors import ModelError

__all__ = ["load_weights"]

_LOG = logging.getLogger("harden")

_REMEDY = "save the state_dict of the same architecture (same model.name and model.args), or drop model.pretrained_file"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, or a one-line :class:`ModelError` naming it (never unpickles)."""
    where = repr(str(path))
    if not path.is_file():
        raise ModelError(f"expected a local weights file, got {where} which does not exist")
    state: Any
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"expected a readable safetensors file at {where}, got one safetensors cannot read ({first}); "
                "the file is truncated or corrupt: save or copy it again"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if found is None:  # torch's weights-only reader refused no object: the stream itself is bad
                raise ModelError(
                    f"expected a weights-only state dict (torch.save of model.state_dict()) at {where}, got a file "
                    "torch cannot read (not a valid pickle stream); the file is truncated or not a PyTorch checkpoint"
                ) from None
            raise ModelError(
                f"expected a weights-only state dict at {where}, got a file holding pickled Python objects (first: "
                f"{found.group(1)}), which "
                "harden will not load (loading them can run code); harden accepts a .safetensors file or a state "
                "dict of tensors: convert it where you made it with "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
            ) from None
        except Exception as exc:  # zip, EOF and format errors of torch's reader
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"expected a weights-only state dict (torch.save of model.state_dict()) at {where}, got a file "
                f"torch cannot read ({type(exc).__name__}: {first}); the file is truncated or corrupt"
            ) from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"expected a dict of tensors (a state dict) in {where}, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(
                f"expected a dict of tensors (a state dict) in {where}, got {type(value).__name__} under {key!r}; "
                "save model.state_dict()"
            )
    return state


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
    return ", ".join(repr(key) for key in keys[:k]) + (" ..." if len(keys) > k else "")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model`` exactly (never downloads, never unpickles).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (a state dict of tensors, or ``{"state_dict": ...}``).
    Every key must match the model's, with its shape, and every value must be finite. The one
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
    state = _read_state(path)
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
    nonfinite = [k for k, v in keep.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ModelError(
            f"expected finite weights in {str(path)!r}, got NaN or infinity in {len(nonfinite)} tensors (first: "
            f"{nonfinite[0]!r}); the file is corrupt or the run that saved it diverged"
        )
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
