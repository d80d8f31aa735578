"""harden.batches: the batch check, seeded loaders, eval batches from any data, devices."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.batches import check_batch, eval_batches, make_loader, resolve_device, to_device
from harden.testing import synthetic_tensors


def good_batch():
    return torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])


def test_check_batch_accepts_a_good_batch():
    x, y = good_batch()
    assert check_batch(x, y, num_classes=3, in_chans=1) is None
    assert check_batch(x.double(), y) is None  # float64 pixels are float pixels


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, y: (x * 2, y), r"expected pixels in \[0, 1\]"),
        (lambda x, y: (x - 0.5, y), r"expected pixels in \[0, 1\]"),
        (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("nan")), y), "finite pixels"),
        (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("inf")), y), "finite pixels"),
        (lambda x, y: (x.repeat(1, 3, 1, 1), y), "expected 1 channels"),
        (lambda x, y: (x[:, 0], y), "4 dims"),
        (lambda x, y: (x, torch.tensor([0, 1, 3, 0])), r"labels in \[0, 2\]"),
        (lambda x, y: (x, torch.tensor([0, -1, 2, 0])), r"labels in \[0, 2\]"),
        (lambda x, y: (x, y[:3]), "one label per image"),
        (lambda x, y: (x, y.float()), "integer class labels"),
        (lambda x, y: ((x * 255).to(torch.uint8), y), "expected float pixels, got torch.uint8"),
        (lambda x, y: ((x * 255).long(), y), "expected float pixels"),
    ],
)
def test_check_batch_rejects(mutate, match):
    x, y = mutate(*good_batch())
    with pytest.raises(harden.DataError, match=match):
        check_batch(x, y, num_classes=3, in_chans=1)


def order(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_make_loader_order_depends_only_on_seed_and_epoch():
    ds = TensorDataset(torch.rand(50, 1, 2, 2), torch.arange(50))
    base = order(make_loader(ds, 8, shuffle=True, seed=1, epoch=2))
    torch.manual_seed(123)  # the global RNG does not matter
    assert order(make_loader(ds, 8, shuffle=True, seed=1, epoch=2)) == base
    assert order(make_loader(ds, 8, shuffle=True, seed=1, epoch=3)) != base
    assert order(make_loader(ds, 8, shuffle=True, seed=2, epoch=2)) != base
    assert sorted(base) == list(range(50))
    assert order(make_loader(ds, 8, shuffle=False)) == list(range(50))
    loader = make_loader(ds, 8, shuffle=True, seed=1, epoch=2)
    assert len(loader) == math.ceil(50 / 8)  # the last partial batch is kept
    assert order(loader) == order(loader)  # iterating twice replays the same order


def as_lists(batches):
    return [(x.shape[0], y.tolist()) for x, y in batches]


@pytest.mark.parametrize("limit", [None, 1, 7, 10, 100])
def test_eval_batches_same_for_tuple_dataset_loader(limit):
    x, y = synthetic_tensors(10)
    want_n = 10 if limit is None else min(limit, 10)
    from_tuple = list(eval_batches((x, y), 4, limit))
    from_ds = list(eval_batches(TensorDataset(x, y), 4, limit))
    from_loader = list(eval_batches(DataLoader(TensorDataset(x, y), batch_size=4), 999, limit))
    for batches in (from_tuple, from_ds, from_loader):
        assert sum(b[0].shape[0] for b in batches) == want_n
        assert torch.equal(torch.cat([b[0] for b in batches]), x[:want_n])
        assert torch.equal(torch.cat([b[1] for b in batches]), y[:want_n])
    assert as_lists(from_tuple) == as_lists(from_ds) == as_lists(from_loader)


def test_eval_batches_errors():
    x, y = synthetic_tensors(4)
    with pytest.raises(harden.DataError, match="as many labels"):
        list(eval_batches((x, y[:3]), 2))
    with pytest.raises(harden.DataError, match="tuple of other things"):
        list(eval_batches((x, y, y), 2))
    with pytest.raises(harden.DataError, match="empty"):
        list(eval_batches((x[:0], y[:0]), 2))
    with pytest.raises(harden.DataError, match="empty dataset"):
        list(eval_batches(TensorDataset(x[:0], y[:0]), 2))


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(harden.DataError, match="CUDA"):
            resolve_device("cuda:0")
    xb, yb = to_device(
        torch.rand(2, 1, 2, 2, dtype=torch.float64), torch.tensor([1, 0], dtype=torch.int32), torch.device("cpu")
    )
    assert (xb.dtype, yb.dtype) == (torch.float32, torch.int64)


def test_check_pixels_reads_any_numpy_layout():
    import numpy as np

    from harden.batches import check_pixels

    x = np.random.default_rng(0).random((2, 1, 4, 4), dtype=np.float32)
    check_pixels(np.flip(x, 3), float32=True)  # negative strides
    check_pixels(x.astype(">f4"), float32=False)  # big-endian
    ro = x.copy()
    ro.setflags(write=False)
    check_pixels(ro, float32=True)  # read-only: no copy warning, no error


def test_predictions_give_minus_one_for_any_non_finite_row():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[0.1, 2.0, 0.0], [nan, 0.0, 0.0], [0.0, nan, 5.0], [inf, 0.0, 0.0], [0.0, -inf, 1.0], [3.0, 1.0, 2.0]]
    )
    pred = harden.batches.predictions(logits)
    assert pred.dtype == torch.int64
    assert pred.tolist() == [1, -1, -1, -1, -1, 0]  # argmax gives 0, 1, 1, 0, 2, 0: the NaN's index or class 0
    assert not bool((pred == torch.tensor([1, 0, 1, 0, 2, 0]))[1:5].any())  # never the label argmax would give
    assert harden.batches.predictions(torch.tensor([[1, 4, 2]])).tolist() == [1]  # integer logits are finite
    with pytest.raises(
        harden.ModelError, match=r"expected logits of shape \(N, classes\) from the model, got shape \(3,\)"
    ):
        harden.batches.predictions(torch.zeros(3))


def test_check_pixels_counts_non_finite_values_and_names_the_first():
    x = torch.rand(3, 1, 4, 4)
    x[2, 0, 1, 3] = float("nan")
    x[2, 0, 3, 0] = float("inf")
    for batch in (x, x.numpy()):
        with pytest.raises(harden.InputError) as info:
            harden.batches.check_pixels(batch)
        assert str(info.value) == (
            "expected finite pixels, got NaN or infinity in 2 values (1 of 3 images), first at index (2, 0, 1, 3); "
            "the contract is float NCHW pixels in [0, 1]"
        )
        assert "nan" not in str(info.value)
    x[2, 0, 3, 0] = 0.5
    with pytest.raises(harden.InputError, match=r"got NaN or infinity in 1 value \(1 of 3 images\), first at index"):
        harden.batches.check_pixels(x)


def test_check_labels_names_the_first_bad_index_and_is_vectorised():
    y = torch.randint(0, 10, (60_000,))
    y[41_234] = 10
    y[50_000] = -3
    with pytest.raises(
        harden.DataError,
        match=r"test split: expected labels in \[0, 9\], got 2 outside it \(values in \[-3, 10\]\), first 10 at index 41234",
    ):
        harden.batches.check_labels(y, 10, where="test split: ")
    with pytest.raises(harden.DataError, match=r"expected integer class labels, got torch\.float32"):
        harden.batches.check_labels(y.float(), 10)
    with pytest.raises(harden.DataError, match=r"expected integer class labels, got torch\.bool"):
        harden.batches.check_labels(y > 0, 10)


class FailsAt(torch.utils.data.Dataset):
    """Eight 2x2 images; loading index ``bad`` raises ``error(message)``."""

    def __init__(self, bad, error, message):
        self.bad, self.error, self.message = bad, error, message

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == self.bad:
            raise self.error(self.message)
        return torch.zeros(1, 2, 2), 0


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            harden.DataError,
            "expected an image file PIL can read, got 'train/dog/1.png' (OSError: truncated); replace it",
        ),
        (harden.InputError, "expected pixels in [0, 1], got values in [0, 255]; divide by 255"),
    ],
)
def test_a_harden_error_in_a_loader_worker_comes_out_as_the_one_line_it_was(error, message):
    dataset = FailsAt(5, error, message)
    with pytest.raises(error) as info:
        list(harden.batches.make_loader(dataset, 2, shuffle=False, num_workers=2))
    assert type(info.value) is error and str(info.value) == message
    user_loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1)  # a user's loader, evaluated
    with pytest.raises(error) as info:
        list(harden.batches.eval_batches(user_loader, 3))
    assert type(info.value) is error and str(info.value) == message


def test_other_errors_in_a_loader_worker_and_errors_without_workers_pass_unchanged():
    with pytest.raises(KeyError) as info:  # not harden's: torch's message, traceback and all
        list(harden.batches.make_loader(FailsAt(1, KeyError, "k"), 2, shuffle=False, num_workers=1))
    assert "Caught KeyError in DataLoader worker process 0" in str(info.value) and "\n" in str(info.value)
    with pytest.raises(harden.DataError) as info:
        list(harden.batches.make_loader(FailsAt(1, harden.DataError, "Caught DataError in me"), 2, shuffle=False))
    assert str(info.value) == "Caught DataError in me"
