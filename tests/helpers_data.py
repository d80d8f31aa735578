"""Helper objects imported by tests through ``module:attr`` strings (data and models)."""

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.data import TensorDataset

from harden.export import INPUT_NAME, OUTPUT_NAME
from harden.testing import TinyMLP, synthetic_tensors

#: an ``nn.Module`` instance of a class from another package (harden.tiny): ``helpers_data:TINY_MLP`` is refused
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


def bad_test_label():
    """Wrong: test example 7 is labelled 3 in 3-class data (train labels 0..2)."""
    train, test = good_data()
    y = test.tensors[1].clone()
    y[7] = 3
    return train, TensorDataset(test.tensors[0], y)


def float_labels():
    """Wrong: float labels."""
    train, test = good_data()
    return TensorDataset(train.tensors[0], train.tensors[1].float()), test


def one_class():
    """Wrong: every label is 0."""
    train, test = good_data()
    return (
        TensorDataset(train.tensors[0], torch.zeros(30, dtype=torch.int64)),
        TensorDataset(test.tensors[0], torch.zeros(12, dtype=torch.int64)),
    )


class ListDataset(torch.utils.data.Dataset):
    """(image, label) pairs from lists, with no label array: labels are read example by example."""

    def __init__(self, images, labels, targets=False):
        self.images, self.labels = images, labels
        if targets:
            self.targets = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def mixed_sizes(targets=False):
    """Wrong: train image 5 is 9x9 among 8x8 images."""
    x, y = synthetic_tensors(12, seed=1)
    images = list(x)
    images[5] = torch.rand(1, 9, 9)
    return ListDataset(images, y.tolist(), targets), ListDataset(list(x), y.tolist(), targets)


def mixed_sizes_with_targets():
    """Wrong: train image 5 is 9x9 among 8x8 images; labels come from ``targets`` (no image read at load)."""
    return mixed_sizes(targets=True)


def negative_label_no_array():
    """Wrong: test example 4 is labelled -1, and no split keeps a label array."""
    x, y = synthetic_tensors(12, seed=1)
    labels = y.tolist()
    labels[4] = -1
    return ListDataset(list(x), y.tolist()), ListDataset(list(x), labels)


class CountingTargets(torch.utils.data.Dataset):
    """A dataset with a ``targets`` array that counts the images it loads."""

    loads = 0

    def __init__(self, n, seed):
        self.x, y = synthetic_tensors(n, seed=seed)
        self.targets = y.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        CountingTargets.loads += 1
        return self.x[i], self.targets[i]


def counting_targets():
    """(train, test) with label arrays: loading the data reads one image per split."""
    CountingTargets.loads = 0
    return CountingTargets(60, 1), CountingTargets(20, 2)


def nan_above_half(path):
    """Logits [1, 0] (class 0) where the mean pixel is below 0.5, NaN where above: ``log(0.5 - mean) * 0``."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [INPUT_NAME], ["flat"]),
            helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["half", "mean"], ["room"]),
            helper.make_node("Log", ["room"], ["log"]),
            helper.make_node("Mul", ["log", "zero"], ["zeroed"]),
            helper.make_node("Add", ["base", "zeroed"], [OUTPUT_NAME]),
        ],
        "nan_above_half",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 2])],
        [
            numpy_helper.from_array(torch.tensor(0.5).numpy(), "half"),
            numpy_helper.from_array(torch.tensor(0.0).numpy(), "zero"),
            numpy_helper.from_array(torch.tensor([[1.0, 0.0]]).numpy(), "base"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path
