"""Mixed precision, ``channels_last`` and ``torch.compile`` for training (all off by default).

- ``train.precision``: ``bf16`` / ``fp16`` run the model's training forwards under
  ``torch.autocast``; the logits and embeddings the objectives read are cast back to float32,
  so the losses (cross-entropy, KL, optimal transport, MI bounds) are computed in float32.
  ``fp16`` scales the loss with ``torch.amp.GradScaler`` (its state is saved in checkpoints and
  restored on resume); ``bf16`` needs no scaling.
- ``train.attack_precision``: the adversarial views of training (PGD, IWD, ...) run in float32
  by default, whatever ``precision`` says. Their gradient steps follow the sign or direction
  of the *input* gradient, which in half precision is coarse and can underflow to zero for
  part of the pixels: a weaker attack, so the model trains on easier examples (and an
  evaluation attack weakened that way fakes robustness). ``same`` runs them under the training
  autocast (faster, at that risk). Verification (the per-epoch probe, ``harden verify``) is
  always float32.
- ``train.channels_last``: the model and each training batch use ``torch.channels_last``
  (faster convolutions on tensor cores); the returned model is converted back.
- ``train.compile``: the training forwards go through ``torch.compile``; attacks, evaluation,
  checkpoints and exports use the plain module, so saved weights keep their plain keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harden.errors import PolicyError

__all__ = ["AMP_DTYPES", "autocast", "autocast_dtype", "grad_scaler", "to_memory_format", "training_forward"]

#: ``train.precision`` -> the autocast dtype (None: float32, no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for ``fp32``).

    Raises:
        PolicyError: an unknown precision, or bf16 on a GPU without bf16 support.

    Example:
        >>> autocast_dtype("bf16", torch.device("cpu"))
        torch.bfloat16
    """
    if precision not in AMP_DTYPES:
        raise PolicyError(f"expected train.precision in {sorted(AMP_DTYPES)}, got {precision!r}")
    dtype = AMP_DTYPES[precision]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PolicyError(f"expected a GPU with bfloat16 support for train.precision 'bf16', got {device}; use fp16")
    return dtype


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A ``GradScaler`` that scales only for ``fp16`` (disabled, a pass-through, otherwise).

    Example:
        >>> grad_scaler("fp32", torch.device("cpu")).is_enabled()
        False
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``; with None, autocast explicitly *disabled*.

    Example:
        >>> with autocast(torch.device("cpu"), None):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if dtype is None:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Convert ``model``'s 4-d parameters and buffers to ``channels_last`` (or back), in place.

    Example:
        >>> conv = to_memory_format(nn.Conv2d(3, 4, 3), True)
        >>> conv.weight.is_contiguous(memory_format=torch.channels_last)
        True
    """
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def training_forward(model: nn.Module, use_compile: bool, **options: Any) -> nn.Module:
    """The module the training forwards call: ``torch.compile(model)`` or ``model`` itself.

    The compiled wrapper shares its parameters with ``model``; keep ``model`` for everything
    else (attacks, evaluation, ``state_dict``) so no ``_orig_mod.`` prefix reaches a file.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> training_forward(lin, False) is lin
        True
    """
    if not use_compile:
        return model
    return torch.compile(model, **options)  # type: ignore[return-value]
