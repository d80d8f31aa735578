"""Data augmentation for training: random crop with zero padding and random horizontal flip.

The standard augmentation of adversarial training on CIFAR-10 (Madry et al. 2018, Rice et al.
2020): each training image is padded with zeros by 1/8 of its side (4 pixels for 32 x 32),
cropped back to its size at a random offset, and mirrored left-right with probability 1/2.
:func:`augment_batch` does it for a whole batch at once, on the batch's device, with every random
number drawn from the caller's generator, so a seeded generator gives the same batch on any
device and a resumed run sees the augmentation an uninterrupted one would.
:func:`augment_enabled` reads the policy's ``data.augment``: on by default for natural images
(``cifar10``, ``imagefolder``), off for the others (a mirrored digit is another digit, or none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from harden.errors import DataError

__all__ = ["AUGMENTED_BY_DEFAULT", "augment_batch", "augment_enabled", "crop_padding"]

#: the datasets whose training images are augmented unless ``data.augment`` says otherwise
AUGMENTED_BY_DEFAULT: frozenset[str] = frozenset({"cifar10", "imagefolder"})


def augment_enabled(data_spec: Any) -> bool:
    """Whether training batches of this data section are augmented.

    ``data.augment`` when it is set; None: on for ``cifar10`` and ``imagefolder``, off for any
    other dataset (digits, synthetic data, your own ``module:function``).

    Example:
        >>> from harden.sources import DataSpec
        >>> augment_enabled(DataSpec(name="cifar10")), augment_enabled(DataSpec(name="digits"))
        (True, False)
        >>> augment_enabled(DataSpec(name="digits", augment=True))
        True
    """
    explicit = getattr(data_spec, "augment", None)
    if explicit is not None:
        return bool(explicit)
    return getattr(data_spec, "name", None) in AUGMENTED_BY_DEFAULT


def crop_padding(side: int) -> int:
    """The zero padding of the random crop for an image side: ``round(side / 8)`` (4 for 32 pixels).

    Example:
        >>> crop_padding(32), crop_padding(8), crop_padding(224)
        (4, 1, 28)
    """
    return round(side / 8)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A randomly cropped (zero padding) and horizontally flipped copy of a batch of images.

    Each image gets its own crop offset, in ``[0, 2 * pad]`` along each axis of the zero-padded
    image (``pad`` = :func:`crop_padding` of that axis' size), and is mirrored left-right with
    probability 1/2. The random numbers are drawn on the CPU from ``generator`` (a CPU
    generator), so the result depends only on ``x`` and the generator's state, on any device;
    the result is on ``x``'s device, with its dtype and shape, and pixels stay in ``x``'s range
    (padding adds zeros, which are in [0, 1]).

    Args:
        x: a float batch ``(N, C, H, W)``.
        generator: a CPU ``torch.Generator`` (seed it from the policy's seed and the epoch).

    Returns:
        A new tensor of ``x``'s shape, dtype and device.

    Raises:
        DataError: ``x`` is not a 4-D batch.

    Example:
        >>> x = torch.rand(5, 3, 32, 32)
        >>> a = augment_batch(x, torch.Generator().manual_seed(0))
        >>> b = augment_batch(x, torch.Generator().manual_seed(0))
        >>> a.shape == x.shape, torch.equal(a, b), bool(a.min() >= 0 and a.max() <= x.max())
        (True, True, True)
    """
    if x.dim() != 4:
        raise DataError(f"expected a batch of images (N, C, H, W) to augment, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    pad_h, pad_w = crop_padding(h), crop_padding(w)
    dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad_w + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    device = x.device
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(device)  # (N, H): rows of the padded image
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(device)  # (N, W)
    cols = torch.where(flip.to(device)[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C): advanced indices first
    return out.permute(0, 3, 1, 2).contiguous()
