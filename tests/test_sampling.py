"""harden.sampling: seeded class-balanced samples."""

from __future__ import annotations

import pytest
import torch

from harden.errors import DataError
from harden.sampling import balanced_indices


def test_class_sorted_labels_give_every_class_an_equal_share() -> None:
    labels = torch.arange(10).repeat_interleave(50)  # 10 classes, sorted, as an imagefolder lists them
    idx = balanced_indices(labels, 100, seed=3)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert torch.bincount(labels[idx], minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, torch.sort(idx).values)  # split order


def test_same_seed_same_sample_other_seed_other_sample() -> None:
    labels = torch.arange(4).repeat(25)
    a, b, c = balanced_indices(labels, 20, 0), balanced_indices(labels, 20, 0), balanced_indices(labels, 20, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_small_class_gives_all_it_has_and_the_rest_is_shared() -> None:
    labels = torch.tensor([0] * 2 + [1] * 30 + [2] * 30)
    counts = torch.bincount(labels[balanced_indices(labels, 20, seed=0)], minlength=3).tolist()
    assert counts[0] == 2 and sum(counts) == 20 and abs(counts[1] - counts[2]) <= 1


def test_remainder_goes_to_distinct_classes() -> None:
    labels = torch.arange(7).repeat(10)
    counts = torch.bincount(labels[balanced_indices(labels, 10, seed=5)], minlength=7)
    assert counts.sum().item() == 10 and counts.max().item() == 2 and counts.min().item() == 1


def test_n_at_least_the_size_keeps_everything() -> None:
    labels = torch.tensor([2, 0, 1, 1])
    assert balanced_indices(labels, 4, 0).tolist() == [0, 1, 2, 3]
    assert balanced_indices(labels, 99, 0).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("labels", "n"), [(torch.zeros(2, 2, dtype=torch.int64), 1), (torch.zeros(3), 1), (torch.zeros(3, dtype=torch.int64), 0)]
)
def test_bad_input_is_one_line_error(labels: torch.Tensor, n: int) -> None:
    with pytest.raises(DataError, match="expected"):
        balanced_indices(labels, n, 0)
