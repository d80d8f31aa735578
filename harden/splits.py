"""Checks on one split of a dataset: one image size, every label, and the first example.

:func:`harden.data.load_data` runs them on the splits of a user's ``module:function`` data (and
the label and first-example checks on every dataset) before anything is trained or written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from harden.batches import check_batch
from harden.errors import DataError

__all__ = ["SameShape", "check_first", "label_array", "split_labels"]


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
