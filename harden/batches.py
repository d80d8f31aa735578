"""``harden.batches``: the pixel contract, and how batches are made, moved and iterated.

:func:`check_pixels` is the one input check (float NCHW pixels in [0, 1], finite, non-empty),
raising one error type, :class:`~harden.errors.InputError`; data batches, attacks, ONNX
sessions and export all call it. :func:`to_device` is the one place batches move to a device.
:mod:`harden.data` (the datasets) re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from harden.errors import DataError, InputError

__all__ = [
    "EvalData",
    "check_batch",
    "check_pixels",
    "eval_batches",
    "make_loader",
    "num_batches",
    "resolve_device",
    "to_device",
]


def make_loader(
    dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, num_workers: int = 0
) -> DataLoader[Any]:
    """A DataLoader whose order depends only on ``(seed, epoch)``, so a resumed run replays it.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.rand(10, 1, 2, 2), torch.arange(10))
        >>> [y.tolist() for _, y in make_loader(ds, 4, shuffle=True, seed=1)] == \
[y.tolist() for _, y in make_loader(ds, 4, shuffle=True, seed=1)]
        True
    """
    key = seed * 100_003 + epoch
    sampler = _ReplaySampler(len(dataset), key) if shuffle else None  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(key)  # worker seeds
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=gen, num_workers=num_workers, drop_last=False
    )


class _ReplaySampler(Sampler[int]):
    """A random permutation drawn afresh from ``seed`` at every iteration.

    Iterating a loader twice, or rebuilding it on resume, replays the same order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def check_pixels(x: Any, *, float32: bool = False, in_chans: int | None = None, where: str = "") -> None:
    """The one input contract: raise :class:`~harden.errors.InputError` unless ``x`` is pixels.

    Pixels are a non-empty float NCHW batch (float32 when ``float32``), finite, in [0, 1]
    (1e-6 of slack for float rounding), with ``in_chans`` channels when given. ``x`` may be a
    torch tensor or a numpy array. Data batches, attacks, ONNX sessions and export all call it.

    Args:
        x: the batch to check.
        float32: require float32 exactly (attacks and ONNX graphs run in float32).
        in_chans: the channel count the model expects (None: any).
        where: what the pixels are, prefixed to the message (e.g. ``"adversarial_inputs: "``).

    Example:
        >>> check_pixels(torch.rand(2, 1, 4, 4))
        >>> check_pixels(torch.rand(2, 1, 4, 4) * 255)
        Traceback (most recent call last):
        ...
        harden.errors.InputError: expected pixels in [0, 1], got values in [...]; divide by 255 or undo normalization (...)
    """
    if isinstance(x, np.ndarray):
        dtype: Any = x.dtype
        is_float = np.issubdtype(x.dtype, np.floating)
        exact = x.dtype == np.float32
    elif isinstance(x, torch.Tensor):
        dtype, is_float, exact = x.dtype, x.is_floating_point(), x.dtype == torch.float32
    else:
        raise InputError(f"{where}expected a numpy array or torch tensor of pixels, got {type(x).__name__}")
    if float32 and not exact:
        short = str(dtype).removeprefix("torch.")  # numpy's and torch's dtypes read alike: "float64"
        raise InputError(f"{where}expected float32 pixels, got {short} (convert with .float() or .astype(np.float32))")
    if not is_float:
        raise InputError(f"{where}expected float pixels, got {dtype}")
    if x.ndim != 4 or x.shape[0] == 0:
        raise InputError(f"{where}expected a non-empty NCHW batch (4 dims), got shape {tuple(x.shape)}")
    if in_chans is not None and x.shape[1] != in_chans:
        raise InputError(
            f"{where}expected {in_chans} channels to match the model, got {x.shape[1]} (shape {tuple(x.shape)})"
        )
    # numpy arrays are read with numpy: any layout (negative strides, big-endian, read-only) works
    lib: Any = np if isinstance(x, np.ndarray) else torch
    finite = lib.isfinite(x)
    if not bool(finite.all()):
        bad = (
            [int(i) for i in lib.nonzero((~finite).reshape(x.shape[0], -1).any(1))[0].tolist()]
            if lib is np
            else ((~finite).flatten(1).any(1).nonzero().flatten().tolist())
        )
        raise InputError(
            f"{where}expected finite pixels, got NaN or infinity in {len(bad)} of {x.shape[0]} images "
            f"(first: image {bad[0]}); the contract is float NCHW pixels in [0, 1]"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(
            f"{where}expected pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; divide by 255 or undo "
            "normalization (mean/std belong inside the model: the policy's model.mean and model.std)"
        )


def check_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None, in_chans: int | None = None) -> None:
    """Raise :class:`DataError` unless ``x`` passes :func:`check_pixels` and ``y`` are valid labels.

    Example:
        >>> check_batch(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), num_classes=2)
    """
    check_pixels(x, in_chans=in_chans)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"expected one label per image ({x.shape[0]}), got labels of shape {tuple(getattr(y, 'shape', ()))}"
        )
    if y.is_floating_point():
        raise DataError(f"expected integer class labels, got {y.dtype}")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"expected labels in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")


def resolve_device(name: str) -> torch.device:
    """The device a policy names: ``cpu``, ``cuda[:N]``, ``mps`` or ``auto`` (cuda if available).

    Raises:
        DataError: cuda was asked for and is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"expected a CUDA device for device={name!r}, got none available; use device: cpu or auto")
    return torch.device(name)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device`` (the one place harden moves batches)."""
    return x.to(device, dtype=torch.float32, non_blocking=True), y.to(device, dtype=torch.int64, non_blocking=True)


EvalData = DataLoader[Any] | Dataset[Any] | tuple[torch.Tensor, torch.Tensor]


def eval_batches(
    data: EvalData, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a DataLoader, a Dataset or an ``(x, y)`` pair, up to ``limit``.

    Example:
        >>> batches = list(eval_batches((torch.rand(5, 1, 2, 2), torch.arange(5)), 2, limit=3))
        >>> [b[0].shape[0] for b in batches]
        [2, 1]
    """
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise DataError("expected data as (x, y) tensors, a Dataset or a DataLoader, got a tuple of other things")
        x_all, y_all = data
        if x_all.shape[0] != y_all.shape[0]:
            raise DataError(f"expected as many labels as images, got {y_all.shape[0]} and {x_all.shape[0]}")
        n = x_all.shape[0] if limit is None else min(limit, x_all.shape[0])
        if n == 0:
            raise DataError("expected at least one example, got an empty (x, y) pair")
        for i in range(0, n, batch_size):
            yield x_all[i : min(i + batch_size, n)], y_all[i : min(i + batch_size, n)]
        return
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    seen = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        if limit is not None and seen + x.shape[0] > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if x.shape[0] == 0:
            break
        seen += x.shape[0]
        yield x, torch.as_tensor(y)
        if limit is not None and seen >= limit:
            break
    if seen == 0:
        raise DataError("expected at least one example, got an empty dataset")


def num_batches(n: int, batch_size: int) -> int:
    """Number of batches for ``n`` examples."""
    return math.ceil(n / batch_size)
