"""``harden.batches``: the pixel contract, and how batches are made, moved and iterated.

:func:`check_pixels` is the one input check (float NCHW pixels in [0, 1], finite, non-empty),
raising one error type, :class:`~harden.errors.InputError`; data batches, attacks, ONNX
sessions and export all call it. :func:`to_device` is the one place batches move to a device.
:mod:`harden.data` (the datasets) re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from harden.errors import DataError, HardenError, InputError, ModelError

__all__ = [
    "EvalData",
    "check_batch",
    "check_labels",
    "check_pixels",
    "eval_batches",
    "make_loader",
    "num_batches",
    "predictions",
    "resolve_device",
    "to_device",
    "unwrap_worker_errors",
]

T = TypeVar("T")


def make_loader(
    dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, num_workers: int = 0
) -> DataLoader[Any]:
    """A DataLoader whose order depends only on ``(seed, epoch)``, so a resumed run replays it.

    With ``num_workers > 0``, a harden error a worker raises (an unreadable image, a mixed size)
    comes out as the one-line error the worker raised (:func:`unwrap_worker_errors`).

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
    return _Loader(
        dataset, batch_size=batch_size, sampler=sampler, generator=gen, num_workers=num_workers, drop_last=False
    )


class _Loader(DataLoader[Any]):
    """A DataLoader whose iteration passes through :func:`unwrap_worker_errors`."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return unwrap_worker_errors(super().__iter__())


def unwrap_worker_errors(batches: Iterable[T]) -> Iterator[T]:
    """Iterate ``batches`` (a DataLoader), re-raising a worker's harden error as the worker raised it.

    With ``num_workers > 0`` PyTorch re-raises a worker's exception in the main process as the
    same class with the worker's whole traceback for a message. A :class:`~harden.errors.HardenError`
    (one line by design: an unreadable image file, an image of another size) comes out here as
    that one line again, of the same class; any other error passes unchanged.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(5, 1, 2, 2), torch.arange(5)), batch_size=2)
        >>> [len(y) for _, y in unwrap_worker_errors(loader)]
        [2, 2, 1]
    """
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except HardenError as exc:
            plain = _worker_message(exc)
            if plain is None:
                raise
            raise plain from None
        yield batch


def _worker_message(exc: HardenError) -> HardenError | None:
    """The error a DataLoader worker raised, from the traceback PyTorch wrapped it in (None if not wrapped)."""
    cls = type(exc)
    text = str(exc)
    if not text.startswith(f"Caught {cls.__name__} in ") or "\nOriginal Traceback" not in text:
        return None
    # the traceback's last exception line is "module.Class: message" (no module for __main__)
    prefixes = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
    for line in reversed(text.rstrip("\n").split("\n")):
        for prefix in prefixes:
            if line.startswith(prefix):
                try:
                    return cls(line[len(prefix) :])
                except Exception:  # a subclass that takes other arguments: keep torch's message
                    return None
    return None


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
        bad = ~finite
        first = tuple(int(i) for i in (np.argwhere(bad)[0] if lib is np else bad.nonzero()[0]))
        images, values = int(bad.reshape(x.shape[0], -1).any(1).sum()), int(bad.sum())
        raise InputError(
            f"{where}expected finite pixels, got NaN or infinity in {values} value{'s' * (values != 1)} "
            f"({images} of {x.shape[0]} images), first at index {first}; the contract is float NCHW pixels in [0, 1]"
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
    check_labels(y, num_classes)


def check_labels(y: torch.Tensor, num_classes: int | None = None, where: str = "") -> None:
    """Raise :class:`DataError` unless ``y`` is a 1-D tensor of integer labels in ``[0, num_classes)``.

    Vectorised: 60,000 labels check in about a millisecond. The message names the first bad index.

    Example:
        >>> check_labels(torch.tensor([0, 2, 1]), 3)
        >>> check_labels(torch.tensor([0, 3, 1, 5]), 3, where="test split: ")
        Traceback (most recent call last):
        ...
        harden.errors.DataError: test split: expected labels in [0, 2], got 2 outside it (values in [0, 5]), first 3 at index 1
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        raise DataError(f"{where}expected a 1-D tensor of labels, got {getattr(y, 'shape', type(y).__name__)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}expected integer class labels, got {y.dtype}")
    if num_classes is None or not y.numel():
        return
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DataError(
            f"{where}expected labels in [0, {num_classes - 1}], got {int(bad.sum())} outside it (values in "
            f"[{int(y.min())}, {int(y.max())}]), first {int(y[i])} at index {i}"
        )


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class per row of ``logits`` (N, C); -1 for a row with any NaN or infinity.

    The one place harden turns logits into answers: a row that is not finite is no answer, so it
    never matches a label (never class 0, the index of a NaN, or ``argmax``'s pick among infinities),
    never votes, and an attack that drives it there has broken the model.

    Example:
        >>> predictions(torch.tensor([[0.1, 2.0], [float("nan"), 0.0], [float("inf"), 0.0]])).tolist()
        [1, -1, -1]
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] == 0:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"expected logits of shape (N, classes) from the model, got {got}")
    pred = logits.argmax(1)
    if logits.is_floating_point():
        pred = pred.masked_fill(~torch.isfinite(logits).all(1), -1)
    return pred


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
    for batch in unwrap_worker_errors(loader):
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
