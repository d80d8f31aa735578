"""Helper objects imported by tests through ``module:attr`` strings (data and models)."""

import torch
from torch.utils.data import TensorDataset

from harden.testing import TinyMLP, synthetic_tensors

#: an ``nn.Module`` instance, for ``model.name: helpers_data:TINY_MLP``
TINY_MLP = TinyMLP(num_classes=3, in_chans=1, image_size=8)


def good_data():
    """(train, test) as TensorDatasets of synthetic 8x8 images, 3 classes."""
    xtr, ytr = synthetic_tensors(30, seed=1)
    xte, yte = synthetic_tensors(12, seed=2)
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)


def returns_list():
    """Wrong: a list instead of a (train, test) tuple."""
    return list(good_data())


def returns_one():
    """Wrong: a single dataset."""
    return good_data()[0]


def returns_numbers():
    """Wrong: not datasets."""
    return 1, 2


def returns_empty():
    """Wrong: an empty test set."""
    train, _ = good_data()
    return train, TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))


def returns_flat():
    """Wrong: samples are flat vectors, not CHW images."""
    return TensorDataset(torch.rand(4, 64), torch.arange(4) % 2), TensorDataset(torch.rand(2, 64), torch.arange(2))


NOT_CALLABLE = 42
