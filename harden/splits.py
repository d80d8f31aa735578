"""One split of a dataset: its checks (one image size, every label, the first example) and its samples.

:func:`harden.data.load_data` runs the checks on the splits of a user's ``module:function`` data
(and the label and first-example checks on every dataset) before anything is trained or written.
Which examples a limit keeps (``train_limit``, ``test_limit``: :func:`sample_indices`;
``verify.n_examples`` and ``check_examples``: :func:`select_examples`) is decided here too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset, TensorDataset

from harden.batches import EvalData, check_batch
from harden.errors import DataError
from harden.sampling import balanced_indices

__all__ = ["SameShape", "Selection", "check_first", "label_array", "sample_indices", "select_examples", "split_labels"]


class SameShape(Dataset[Any]):
    """A user's split whose every image must have the shape ``shape`` (a mixed size is a :class:`DataError`).

    Checked as each example is loaded, so no image is read twice; a collated batch never meets two sizes.

    Args:
        dataset: the split, yielding ``(image, label)`` pairs.
        part: ``"train"`` or ``"test"`` (for the message).
        name: the data's name (for the message).
        shape: the shape of every image (that of example 0).

    Example:
        >>> ds = SameShape(TensorDataset(torch.zeros(2, 1, 4, 4), torch.arange(2)), "train", "mine", (1, 4, 4))
        >>> len(ds), tuple(ds[1][0].shape)
        (2, (1, 4, 4))
    """

    def __init__(self, dataset: Dataset[Any], part: str, name: str, shape: tuple[int, ...]) -> None:
        self.dataset, self.part, self.name, self.shape = dataset, part, name, shape

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if got != self.shape:
            raise DataError(
                f"expected every {self.part} image of {self.name!r} shaped {self.shape} like example 0, got {got} at "
                f"index {i}; resize them in the dataset (e.g. torchvision.transforms.Resize and CenterCrop)"
            )
        return item


def label_array(ds: Any) -> torch.Tensor | None:
    """The labels of a split without loading an image (None where the dataset keeps no label array).

    Read from a ``TensorDataset``'s second tensor or a ``targets`` attribute, through
    :class:`SameShape` and ``Subset`` wrappers.

    Example:
        >>> label_array(Subset(TensorDataset(torch.zeros(4, 1, 2, 2), torch.tensor([3, 1, 2, 0])), [2, 0])).tolist()
        [2, 3]
    """
    if isinstance(ds, SameShape):
        return label_array(ds.dataset)
    if isinstance(ds, Subset):
        base = label_array(ds.dataset)
        idx = ds.indices
        if base is None:
            return None
        return base[idx.start : idx.stop : idx.step] if isinstance(idx, range) else base[torch.as_tensor(list(idx))]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1] if len(ds.tensors) > 1 else None
    targets = getattr(ds, "targets", None)
    if targets is None:
        return None
    try:
        return torch.as_tensor(np.asarray(targets))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"expected integer labels in the dataset's targets, got {exc}") from None


def split_labels(ds: Dataset[Any], part: str, name: str) -> torch.Tensor:
    """Every label of a split: its :func:`label_array`, else one pass over its examples (reading the labels).

    Raises:
        DataError: an example is not an ``(image, label)`` pair, or a label is not one value.

    Example:
        >>> split_labels([(torch.zeros(1, 2, 2), 1), (torch.zeros(1, 2, 2), 0)], "train", "mine").tolist()
        [1, 0]
    """
    n: int = len(ds)  # type: ignore[arg-type]
    labels = label_array(ds)
    if labels is None:
        values = []
        for i in range(n):
            try:
                y = torch.as_tensor(ds[i][1])
            except DataError:  # an unreadable or mis-sized image, named already
                raise
            except (IndexError, TypeError, KeyError, ValueError, RuntimeError) as exc:
                raise DataError(
                    f"expected {part} examples of {name!r} as (image, label) pairs, got {exc!r} at index {i}"
                ) from None
            if y.numel() != 1:
                raise DataError(
                    f"expected one label per {part} example of {name!r}, got shape {tuple(y.shape)} at index {i}"
                )
            values.append(y.reshape(()))
        labels = torch.stack(values) if values else torch.zeros(0, dtype=torch.int64)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise DataError(f"expected one label per {part} example of {name!r} ({n}), got shape {tuple(labels.shape)}")
    return labels


def check_first(dataset: Dataset[Any], part: str, name: str, num_classes: int, in_chans: int) -> None:
    """:func:`~harden.batches.check_batch` on the first example of ``dataset`` (catches 0-255 pixels and bad labels early).

    Raises:
        DataError: example 0 is not an ``(image, label)`` pair of a CHW tensor and a valid label;
            :class:`~harden.errors.InputError` (a ``DataError``) for pixels outside the contract.

    Example:
        >>> check_first(TensorDataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 1])), "train", "mine", 2, 1)
        >>> check_first(TensorDataset(torch.rand(2, 1, 4, 4) * 255, torch.tensor([0, 1])), "train", "mine", 2, 1)
        Traceback (most recent call last):
        ...
        harden.errors.InputError: 'mine' train example 0: expected pixels in [0, 1], got values in [...]; ...
    """
    try:
        first = dataset[0]
        x, y = first[0], first[1]
    except DataError:  # an unreadable image file, named already
        raise
    except (IndexError, TypeError, KeyError, ValueError) as exc:
        raise DataError(f"expected {part} examples of {name!r} as (image, label) pairs, got {exc!r}") from None
    if not isinstance(x, torch.Tensor):
        raise DataError(f"expected {part} images of {name!r} as CHW float tensors, got {type(x).__name__}")
    try:
        check_batch(x.unsqueeze(0), torch.as_tensor(y).reshape(1), num_classes, in_chans)
    except DataError as exc:  # keeps the class: a pixel problem stays an InputError
        raise type(exc)(f"{name!r} {part} example 0: {exc}") from None


@dataclass
class Selection:
    """Which examples of the data handed over a cascade verifies (see :func:`select_examples`).

    Attributes:
        data: the data restricted to those examples, in the data's order.
        indices: per verified example, its index in the data handed over (None: not known in
            advance; the first examples as they come).
        check: per verified example, whether it is in the check subset (None with ``indices``).
        sample: how they were drawn: ``balanced`` or ``first``.
    """

    data: EvalData
    indices: list[int] | None
    check: list[bool] | None
    sample: str


def select_examples(data: EvalData, limit: int | None, check_examples: int, sample: str, seed: int) -> Selection:
    """The examples to verify and the check subset among them.

    ``balanced``: a seeded class-balanced sample (:func:`harden.sampling.balanced_indices`) of
    ``limit`` examples, and the check subset a class-balanced sample of ``check_examples`` of them
    (same seed); ``first``: the first ``limit``, and the first ``check_examples`` of those. The
    labels are read from the data's label array (a tensor pair, a ``TensorDataset``, a
    ``targets`` attribute), else in one pass over the examples, and only when a sample is drawn.
    A DataLoader with its own sampler (or without a length) is taken as it comes: the first
    ``limit`` examples, with a warning when ``balanced`` was asked for.

    Example:
        >>> x, y = torch.rand(12, 1, 2, 2), torch.tensor([0] * 6 + [1] * 6)
        >>> sel = select_examples((x, y), 4, 2, "balanced", seed=0)
        >>> sorted(y[sel.indices].tolist()), sum(sel.check)
        ([0, 0, 1, 1], 2)
        >>> select_examples((x, y), 4, 2, "first", seed=0).indices
        [0, 1, 2, 3]
    """
    total = _length(data)
    if total is None:  # also a malformed (x, y) pair: the batches refuse it with the reason
        if sample == "balanced" and not isinstance(data, tuple):
            warnings.warn(
                "verify.sample 'balanced' needs the data's labels in advance; a DataLoader with its own sampler "
                "(or data without a length) is verified in its own order (its first examples): pass a Dataset, "
                "a DataLoader without shuffling or (x, y) tensors for a class-balanced sample",
                UserWarning,
                stacklevel=3,
            )
        return Selection(data, None, None, "first")
    k = total if limit is None else min(limit, total)
    labels = _labels(data) if sample == "balanced" and (k < total or check_examples < k) else None
    idx = balanced_indices(labels, k, seed) if labels is not None and k < total else torch.arange(k)
    check = torch.zeros(k, dtype=torch.bool)
    if check_examples >= k:
        check[:] = True
    elif check_examples > 0:
        chosen = (
            balanced_indices(labels[idx], check_examples, seed) if labels is not None else torch.arange(check_examples)
        )
        check[chosen] = True
    return Selection(_restrict(data, idx, total), idx.tolist(), check.tolist(), sample)


def _length(data: EvalData) -> int | None:
    """How many examples ``data`` holds, when it can be indexed in order; None otherwise."""
    if isinstance(data, tuple):
        pair = len(data) == 2 and all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in data)
        return int(data[0].shape[0]) if pair and data[0].shape[0] == data[1].shape[0] else None
    if isinstance(data, DataLoader):
        sequential = isinstance(data.sampler, SequentialSampler) and data.batch_size is not None
        return _length(data.dataset) if sequential else None
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _labels(data: EvalData) -> torch.Tensor:
    """Every label of ``data`` (an indexable Dataset, a sequential DataLoader's dataset, or an (x, y) pair), on the CPU."""
    if isinstance(data, tuple):
        return torch.as_tensor(data[1]).cpu()
    ds = data.dataset if isinstance(data, DataLoader) else data
    labels = label_array(ds)
    return (labels if labels is not None else split_labels(ds, "test", "the verified data")).cpu()


def _restrict(data: EvalData, idx: torch.Tensor, total: int) -> EvalData:
    """``data`` restricted to the examples ``idx`` (in order); ``data`` itself when that is all of it."""
    if idx.numel() == total:
        return data
    if isinstance(data, tuple):
        x, y = data
        return x[idx.to(x.device)], y[idx.to(y.device)]
    if isinstance(data, DataLoader):
        return DataLoader(
            Subset(data.dataset, idx.tolist()),
            batch_size=data.batch_size,
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
        )
    return Subset(data, idx.tolist())


def sample_indices(ds: Any, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending) of a seeded sample of ``n`` examples of a split (all of them when it has no more).

    Class-balanced (:func:`harden.sampling.balanced_indices`) where the labels are known without
    loading an image (``labels``, or the split's :func:`label_array`); else a seeded uniform
    random sample, so a limit never reads every image of a large split.

    Example:
        >>> ds = TensorDataset(torch.zeros(8, 1, 2, 2), torch.tensor([0] * 4 + [1] * 4))
        >>> sample_indices(ds, 4, seed=0).tolist() == sample_indices(ds, 4, seed=0).tolist()
        True
        >>> torch.bincount(ds.tensors[1][sample_indices(ds, 4, seed=0)]).tolist()
        [2, 2]
    """
    total = len(ds)
    if n >= total:
        return torch.arange(total, dtype=torch.int64)
    labels = labels if labels is not None else label_array(ds)
    if labels is not None:
        return balanced_indices(labels.cpu(), n, seed)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(total, generator=gen)[:n]).values
