"""Model adapters: the :class:`Normalized` wrapper (normalization inside), device and output checks.

Every model harden trains, attacks or exports is a :class:`Normalized` wrapper, so attacks,
checks and the ONNX graph all take pixels in [0, 1] and the mean/std live in the weights; it also
reads the logits out of a model that returns a dict, a tuple or an object (``model.output``).
The normalization is only ever what the policy (``model.mean``/``model.std``) or the caller
states, never taken silently from elsewhere. Building a model by name (timm or
``package.module:attr``) and loading weights files for evaluation live in
:mod:`harden.model_load`; weights files are read by :mod:`harden.weights` (:func:`load_weights`,
re-exported here).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from harden.errors import HardenError, ModelError
from harden.weights import load_weights

__all__ = [
    "Normalized",
    "check_model",
    "has_state",
    "load_weights",
    "model_device",
    "prepare_model",
]


class Normalized(nn.Module):
    """Wrap a classifier so that it takes pixels in [0, 1], normalizes internally and returns logits.

    Args:
        model: the classifier.
        mean: per-channel mean, or None for no normalization.
        std: per-channel std, or None for no normalization.
        output: where the logits are in what ``model`` returns: None (it returns the logits
            tensor), a string (that key of a returned dict, or that attribute of a returned
            object, e.g. ``"logits"`` for Hugging Face outputs) or an integer (that item of a
            returned tuple or list). Only the types are looked at, so the forward traces and
            exports to ONNX.

    Example:
        >>> net = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), mean=(0.5,), std=(0.25,))
        >>> net(torch.full((1, 1, 2, 2), 0.5)).shape
        torch.Size([1, 2])
        >>> net.describe_normalization()
        'mean (0.5), std (0.25)'
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output: int | str | None = None,
    ):
        super().__init__()
        if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str)) or output == ""):
            raise ModelError(f"expected model.output as an item index, a key or an attribute name, got {output!r}")
        if isinstance(output, int) and output < 0:
            raise ModelError(f"expected model.output as an item index >= 0, got {output}")
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
        self.output = output

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

    def describe_normalization(self) -> str:
        """One line naming the normalization, e.g. ``mean (0.4914, 0.4822, 0.4465), std (0.247, 0.2435, 0.2616)``."""
        if not self.has_norm:
            return "none: the model sees pixels in [0, 1]"
        return f"mean {_values(self.mean_values)}, std {_values(self.std_values)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for pixels ``x`` in [0, 1], NCHW."""
        return self._logits(self.model(self.normalize(x)))

    def _logits(self, out: Any) -> torch.Tensor:
        """The logits in the model's output, as :attr:`output` says (types only: no branch on values)."""
        key = self.output
        if key is None:
            if isinstance(out, torch.Tensor):
                return out
            raise ModelError(f"expected logits (a tensor) from the model, got {_what(out)}; {_output_hint(out)}")
        picked: Any = None
        if isinstance(key, str) and isinstance(out, Mapping) and key in out:
            picked = out[key]
        elif isinstance(key, str) and not isinstance(out, (Mapping, torch.Tensor)) and hasattr(out, key):
            picked = getattr(out, key)
        elif isinstance(key, int) and isinstance(out, (tuple, list)) and key < len(out):
            picked = out[key]
        else:
            raise ModelError(
                f"model.output: expected {key!r} in what the model returns, got {_what(out)}; {_output_hint(out)}"
            )
        if not isinstance(picked, torch.Tensor):
            raise ModelError(f"model.output: expected the logits tensor at {key!r}, got {type(picked).__name__}")
        return picked


def _values(values: Sequence[float] | None) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values or ()) + ")"


def _what(out: Any) -> str:
    """What a model returned, for a message: a dict and its keys, a tuple and its length, an object."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        keys = [str(k) for k in list(out)[:6]]
        return f"a {type(out).__name__} with keys {keys}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}" + (" with attribute .logits" if hasattr(out, "logits") else "")


def _output_hint(out: Any) -> str:
    """The remedy: which ``model.output`` would read the logits from ``out``."""
    if isinstance(out, Mapping):
        keys = [k for k in out if isinstance(k, str)]
        example = "logits" if "logits" in keys else (keys[0] if keys else "logits")
    elif isinstance(out, (tuple, list)):
        example = "0"
    else:
        example = "logits"
    return (
        f"set model.output to where the logits are (e.g. `model.output: {example}`; "
        f"output={example if example.isdigit() else repr(example)} in Python)"
    )


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


def prepare_model(model: nn.Module, spec: object | None = None) -> Normalized:
    """Wrap a user's ``nn.Module`` in :class:`Normalized` (mean/std and output from ``spec`` if set).

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
    return Normalized(model, mean, std, getattr(spec, "output", None))


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
            output is not ``(N, C)`` logits with ``C >= 2`` (and ``C >= num_classes`` when given:
            a head with fewer outputs than the data's classes is named as the model's fault).

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
    except HardenError:  # e.g. Normalized's one-line "set model.output": already says what to do
        raise
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
    if num_classes is not None and num_classes >= 2 and classes < num_classes:  # labels out of the head's range
        raise ModelError(
            f"expected the model to output {num_classes} logits (the data has {num_classes} classes), got {classes}: "
            "set model.num_classes / the classifier size to the data's classes"
        )
    if classes < 2:
        raise ModelError(f"expected at least 2 logits per image from the model, got {classes}")
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
