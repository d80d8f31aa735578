"""Data adapters: bundled sets, local roots, user functions, batch checks and loaders."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.data import DataBundle, check_batch, eval_batches, load_data, make_loader, resolve_device, to_device
from harden.policy import DataSpec
from harden.testing import synthetic_tensors

HERE = Path(__file__).resolve().parent


def stack(ds):
    xs, ys = zip(*[ds[i] for i in range(len(ds))], strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def assert_pixels(x):
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0


@pytest.fixture(scope="module")
def mnist5k():
    return load_data(DataSpec(name="mnist-5k"))


def test_digits_bundle():
    b = load_data(DataSpec(name="digits"))
    assert isinstance(b, DataBundle)
    assert (b.name, b.num_classes, b.image_shape, b.in_chans) == ("digits", 10, (1, 8, 8), 1)
    assert len(b.train) + len(b.test) == 1797
    assert len(b.test) == pytest.approx(0.2 * 1797, abs=10)
    xtr, ytr = stack(b.train)
    xte, _ = stack(b.test)
    assert xtr.shape[1:] == (1, 8, 8)
    assert_pixels(xtr)
    assert_pixels(xte)
    assert float(xtr.max()) == 1.0
    assert ytr.dtype == torch.int64
    assert set(ytr.tolist()) == set(range(10))
    assert b.class_names == tuple(str(i) for i in range(10))


def test_mnist5k_bundle(mnist5k):
    b = mnist5k
    assert (b.name, b.num_classes, b.image_shape) == ("mnist-5k", 10, (1, 28, 28))
    assert (len(b.train), len(b.test)) == (4000, 1000)
    xtr, ytr = stack(b.train)
    xte, yte = stack(b.test)
    assert xtr.shape == (4000, 1, 28, 28)
    assert_pixels(xtr)
    assert_pixels(xte)
    assert torch.bincount(yte, minlength=10).tolist() == [100] * 10
    assert ytr.dtype == yte.dtype == torch.int64


def test_mnist5k_split_is_identical_across_loads(mnist5k):
    again = load_data(DataSpec(name="mnist-5k"))
    for a, b in ((mnist5k.train, again.train), (mnist5k.test, again.test)):
        xa, ya = stack(a)
        xb, yb = stack(b)
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
    # the test split is disjoint from the training split
    train_rows = {r.numpy().tobytes() for r in stack(mnist5k.train)[0][:500]}
    assert not any(r.numpy().tobytes() in train_rows for r in stack(mnist5k.test)[0])


def test_train_and_test_limits():
    b = load_data(DataSpec(name="synthetic", train_limit=10, test_limit=5))
    assert (len(b.train), len(b.test)) == (10, 5)
    full = load_data(DataSpec(name="synthetic"))
    assert torch.equal(stack(b.train)[0], stack(full.train)[0][:10])  # the first N, in order
    big = load_data(DataSpec(name="synthetic", train_limit=10**6))
    assert len(big.train) == len(full.train)


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_local_datasets_need_a_root(name):
    with pytest.raises(harden.DataError, match=r"expected data\.root .*got none"):
        load_data(DataSpec(name=name))


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_local_datasets_with_a_missing_root(tmp_path, name):
    missing = tmp_path / "absent"
    with pytest.raises(harden.DataError, match=r"expected data\.root") as info:
        load_data(DataSpec(name=name, root=str(missing)))
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_cifar10_root_without_the_archive(tmp_path):
    with pytest.raises(harden.DataError, match="cifar-10-batches-py"):
        load_data(DataSpec(name="cifar10", root=str(tmp_path)))


def make_image_folder(root, splits=("train", "test"), classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
                arr[..., 0] = 255 * ci
                mode = "L" if i == 0 else "RGB"  # grey images are converted to RGB
                img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode)
                img.save(d / f"{i}.png")


def test_imagefolder_from_pngs(tmp_path):
    make_image_folder(tmp_path)
    b = load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=8))
    assert (b.num_classes, b.image_shape, b.class_names) == (2, (3, 8, 8), ("cat", "dog"))
    assert (len(b.train), len(b.test)) == (6, 6)
    x, y = stack(b.train)
    assert x.shape == (6, 3, 8, 8)
    assert_pixels(x)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(x[y == 1, 0].min()) == 1.0  # the red channel of "dog" is saturated


def test_imagefolder_accepts_val_and_checks_layout(tmp_path):
    make_image_folder(tmp_path / "a", splits=("train", "val"))
    assert len(load_data(DataSpec(name="imagefolder", root=str(tmp_path / "a"), image_size=4)).test) == 6
    make_image_folder(tmp_path / "b", splits=("train",))
    with pytest.raises(harden.DataError, match=r"train/ and test/"):
        load_data(DataSpec(name="imagefolder", root=str(tmp_path / "b")))


def test_imagefolder_class_mismatch(tmp_path):
    make_image_folder(tmp_path, splits=("train",), classes=("a", "b"))
    make_image_folder(tmp_path, splits=("test",), classes=("a", "c"))
    with pytest.raises(harden.DataError, match="same class folders"):
        load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=4))


@pytest.fixture
def helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_module_function_data(helpers_on_path):
    b = load_data(DataSpec(name="helpers_data:good_data"))
    assert (len(b.train), len(b.test)) == (30, 12)
    assert (b.num_classes, b.image_shape, b.name) == (3, (1, 8, 8), "helpers_data:good_data")
    x, _ = stack(b.train)
    assert torch.equal(x, synthetic_tensors(30, seed=1)[0])
    limited = load_data(DataSpec(name="helpers_data:good_data", train_limit=4))
    assert len(limited.train) == 4


@pytest.mark.parametrize(
    ("function", "match"),
    [
        ("returns_list", r"to return \(train_dataset, test_dataset\), got list"),
        ("returns_one", r"to return \(train_dataset, test_dataset\), got TensorDataset"),
        ("returns_numbers", "expected a map-style Dataset for train"),
        ("returns_empty", "expected non-empty train and test"),
        ("returns_flat", "CHW tensors"),
        ("NOT_CALLABLE", "to be a function"),
        ("no_such_function", "no attribute 'no_such_function'"),
    ],
)
def test_module_function_data_errors(helpers_on_path, function, match):
    with pytest.raises(harden.DataError, match=match):
        load_data(DataSpec(name=f"helpers_data:{function}"))


def test_module_function_data_unimportable():
    with pytest.raises(harden.DataError, match="importable module"):
        load_data(DataSpec(name="no_such_module_xyz:data"))


# --------------------------------------------------------------------------- check_batch


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


# --------------------------------------------------------------------------- loaders


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
