"""harden.splits: one image size per split, every label read (from a label array where there is one), example 0."""

import warnings

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import harden
from harden.sampling import balanced_indices
from harden.splits import SameShape, check_first, label_array, sample_indices, select_examples, split_labels


class Pairs(torch.utils.data.Dataset):
    """(image, label) pairs from lists, counting the examples it loads; no label array."""

    def __init__(self, images, labels):
        self.images, self.labels, self.loads = images, labels, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.loads += 1
        return self.images[i], self.labels[i]


def test_same_shape_refuses_another_size_in_one_line_naming_the_index():
    images = [torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 5, 4)]
    ds = SameShape(Pairs(images, [0, 1, 0]), "test", "mod:fn", (1, 4, 4))
    assert len(ds) == 3
    assert torch.equal(ds[1][0], images[1]) and ds[1][1] == 1
    with pytest.raises(harden.DataError) as info:
        ds[2]
    assert str(info.value) == (
        "expected every test image of 'mod:fn' shaped (1, 4, 4) like example 0, got (1, 5, 4) at index 2; resize "
        "them in the dataset (e.g. torchvision.transforms.Resize and CenterCrop)"
    )


def test_label_array_reads_labels_through_wrappers_without_loading_images():
    y = torch.tensor([4, 3, 2, 1, 0])
    base = TensorDataset(torch.zeros(5, 1, 2, 2), y)
    assert torch.equal(label_array(base), y)
    assert label_array(Subset(base, range(1, 5, 2))).tolist() == [3, 1]
    assert label_array(Subset(SameShape(base, "train", "d", (1, 2, 2)), [4, 0])).tolist() == [0, 4]
    assert label_array(TensorDataset(torch.zeros(2, 1, 2, 2))) is None
    pairs = Pairs([torch.zeros(1, 2, 2)] * 3, [1, 0, 1])
    assert label_array(pairs) is None and label_array(Subset(pairs, [0])) is None
    pairs.targets = [1, 0, 1]
    assert label_array(pairs).tolist() == [1, 0, 1]
    assert pairs.loads == 0
    pairs.targets = [[1], [0, 1], 2]  # ragged: no array
    with pytest.raises(harden.DataError, match="expected integer labels in the dataset's targets"):
        label_array(pairs)


def test_split_labels_reads_each_example_when_there_is_no_array():
    pairs = Pairs([torch.zeros(1, 2, 2)] * 3, [2, torch.tensor(0), torch.tensor([1])])
    assert split_labels(pairs, "train", "d").tolist() == [2, 0, 1]
    assert pairs.loads == 3
    assert split_labels(Pairs([], []), "train", "d").tolist() == []


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        (
            Pairs([torch.zeros(1, 2, 2)] * 2, [0, torch.tensor([0, 1])]),
            r"one label per train example of 'd', got shape \(2,\) at index 1",
        ),
        ([torch.zeros(1, 2, 2)], r"train examples of 'd' as \(image, label\) pairs, got IndexError.* at index 0"),
        (
            TensorDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, 3)),
            r"one label per train example of 'd' \(2\), got shape \(2, 3\)",
        ),
    ],
)
def test_split_labels_errors_are_one_line(dataset, match):
    with pytest.raises(harden.DataError, match=match) as info:
        split_labels(dataset, "train", "d")
    assert "\n" not in str(info.value)


def test_split_labels_passes_an_image_error_on_unchanged():
    ds = SameShape(Pairs([torch.zeros(1, 2, 2), torch.zeros(1, 3, 3)], [0, 1]), "train", "d", (1, 2, 2))
    with pytest.raises(harden.DataError, match=r"^expected every train image of 'd' shaped \(1, 2, 2\)"):
        split_labels(ds, "train", "d")


def test_check_first_prefixes_the_split_and_keeps_the_error_class():
    check_first(TensorDataset(torch.rand(2, 1, 2, 2), torch.tensor([1, 0])), "train", "d", 2, 1)
    with pytest.raises(harden.InputError, match=r"^'d' test example 0: expected pixels in \[0, 1\]"):
        check_first(TensorDataset(torch.rand(1, 1, 2, 2) * 255, torch.tensor([0])), "test", "d", 2, 1)
    with pytest.raises(harden.DataError, match=r"^'d' train example 0: expected labels in \[0, 1\], got 1 outside"):
        check_first(TensorDataset(torch.rand(1, 1, 2, 2), torch.tensor([2])), "train", "d", 2, 1)
    with pytest.raises(harden.DataError, match="expected train images of 'd' as CHW float tensors, got list"):
        check_first(Pairs([[0.0]], [0]), "train", "d", 2, 1)
    with pytest.raises(harden.DataError, match=r"as \(image, label\) pairs, got IndexError"):
        check_first([torch.zeros(1, 2, 2)], "train", "d", 2, 1)


def _sorted(n=30):
    y = torch.arange(n) * 3 // n  # class-sorted: 0 ... 0 1 ... 1 2 ... 2
    return torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(0)), y


def test_select_examples_balanced_on_every_kind_of_data():
    x, y = _sorted()
    idx = balanced_indices(y, 12, 3)
    pos = balanced_indices(y[idx], 6, 3)
    for data in ((x, y), TensorDataset(x, y), Pairs(list(x), y.tolist())):
        sel = select_examples(data, 12, 6, "balanced", seed=3)
        assert sel.indices == idx.tolist() and sel.sample == "balanced"
        assert [i for i, c in enumerate(sel.check) if c] == pos.tolist()
        kept = sel.data[0] if isinstance(sel.data, tuple) else torch.stack([sel.data[i][0] for i in range(12)])
        assert torch.equal(kept, x[idx])


def test_select_examples_first_and_when_all_are_kept():
    x, y = _sorted()
    first = select_examples((x, y), 12, 4, "first", seed=3)
    assert first.indices == list(range(12)) and first.check == [True] * 4 + [False] * 8
    pairs = Pairs(list(x), y.tolist())
    everything = select_examples(pairs, None, 50, "balanced", seed=3)  # nothing to draw: no label is read
    assert everything.data is pairs and everything.indices == list(range(30)) and all(everything.check)
    assert pairs.loads == 0


def test_sample_indices_balanced_with_labels_else_uniform_and_seeded():
    x, y = _sorted()
    assert sample_indices(TensorDataset(x, y), 9, 1).tolist() == balanced_indices(y, 9, 1).tolist()
    pairs = Pairs(list(x), y.tolist())
    uniform = sample_indices(pairs, 9, 1)
    assert pairs.loads == 0  # no image was loaded to draw it
    assert uniform.tolist() == sorted(torch.randperm(30, generator=torch.Generator().manual_seed(1))[:9].tolist())
    assert sample_indices(pairs, 40, 1).tolist() == list(range(30))


def test_select_examples_leaves_a_malformed_pair_to_the_batches_without_a_warning():
    x, y = _sorted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = select_examples((x, y[:10]), 5, 2, "balanced", seed=0)
    assert sel.indices is None and sel.data[1].shape == (10,)  # eval_batches refuses it, naming both sizes
