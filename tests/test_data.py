"""harden.data: the bundled datasets, local roots and user data functions."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import harden
from harden.data import DataBundle, load_data, make_loader
from harden.policy import DataSpec
from harden.sampling import balanced_indices
from harden.testing import synthetic_tensors, tiny_policy

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


def test_train_and_test_limits_keep_a_seeded_class_balanced_sample():
    b = load_data(DataSpec(name="synthetic", train_limit=10, test_limit=5))
    assert (len(b.train), len(b.test)) == (10, 5)
    full = load_data(DataSpec(name="synthetic"))
    for part, n in (("train", 10), ("test", 5)):
        x_all, y_all = stack(getattr(full, part))
        keep = balanced_indices(y_all, n, 0)  # the fixed seed of the bundled splits
        x, y = stack(getattr(b, part))
        assert torch.equal(x, x_all[keep]) and torch.equal(y, y_all[keep])  # in split order
    assert sorted(torch.bincount(stack(b.train)[1]).tolist()) == [3, 3, 4]  # 10 over 3 classes: 3 each, 1 drawn
    again = load_data(DataSpec(name="synthetic", train_limit=10))
    assert torch.equal(stack(again.train)[0], stack(b.train)[0])
    other = load_data(DataSpec(name="synthetic", train_limit=10), seed=1)
    assert not torch.equal(stack(other.train)[0], stack(b.train)[0])
    big = load_data(DataSpec(name="synthetic", train_limit=10**6))
    assert len(big.train) == len(full.train)


class _NoLabelArray(torch.utils.data.Dataset):
    """A dataset that keeps no label array (labels are known only by loading an example)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.fixture
def sorted_module(monkeypatch):
    """A module ``sorteddata`` whose ``data`` is class-sorted (60 train, 30 test, 3 classes) and ``plain`` keeps no label array."""
    import sys
    import types

    mod = types.ModuleType("sorteddata")
    (x, y), (xt, yt) = synthetic_tensors(60, seed=1), synthetic_tensors(30, seed=2)
    order, order_t = torch.argsort(y, stable=True), torch.argsort(yt, stable=True)

    def data():
        return TensorDataset(x[order], y[order]), TensorDataset(xt[order_t], yt[order_t])

    def plain():
        return _NoLabelArray(x[order], y[order]), _NoLabelArray(xt[order_t], yt[order_t])

    for fn in (data, plain):
        fn.__module__ = "sorteddata"
        setattr(mod, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "sorteddata", mod)
    return mod


def test_limits_on_class_sorted_data_cover_every_class(sorted_module):
    b = load_data(DataSpec(name="sorteddata:data", train_limit=12, test_limit=6))
    assert torch.bincount(stack(b.train)[1]).tolist() == [4, 4, 4]  # the first 12 would be class 0 only
    assert torch.bincount(stack(b.test)[1]).tolist() == [2, 2, 2]


def test_limits_without_a_label_array_draw_a_seeded_sample_without_reading_every_image(sorted_module):
    b = load_data(DataSpec(name="sorteddata:plain", train_limit=12, test_limit=6))
    _, test = sorted_module.plain()
    # the train labels were read anyway (to count the classes): balanced
    assert torch.bincount(stack(b.train)[1]).tolist() == [4, 4, 4]
    # the test split keeps no label array: a seeded uniform sample, in split order
    keep = torch.sort(torch.randperm(30, generator=torch.Generator().manual_seed(0))[:6]).values
    assert b.test.indices == keep.tolist()
    assert torch.equal(stack(b.test)[0], stack(test)[0][keep])


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


def make_square_folder(root, sizes):
    """train/ and test/ with classes a and b, one PNG per (split, class, size) of each side in ``sizes``."""
    for split in ("train", "test"):
        for ci, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(np.full((h, w, 3), 200 * ci, dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_imagefolder_takes_the_images_own_size_reading_only_their_headers(tmp_path, monkeypatch):
    from PIL import ImageFile

    make_square_folder(tmp_path, [(6, 6)] * 3)
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or original(self))
    b = load_data(DataSpec(name="imagefolder", root=str(tmp_path)))
    auto = len(decoded)
    load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=6))
    # the size came from the 12 headers: no more decoding than with the size given (example 0 of each split)
    assert 0 < auto == len(decoded) - auto
    assert b.image_shape == (3, 6, 6) and stack(b.train)[0].shape == (6, 3, 6, 6)


@pytest.mark.parametrize(
    ("sizes", "found"),
    [([(6, 6), (6, 6), (9, 9)], r"6x6 \(8 images, e\.g\. .*\), 9x9 \(4 images"), ([(10, 12)], r"10x12 \(4 images")],
    ids=["mixed", "not-square"],
)
def test_imagefolder_without_one_square_size_asks_for_image_size(tmp_path, sizes, found):
    make_square_folder(tmp_path, sizes)
    with pytest.raises(harden.DataError, match=rf"share one square size, or data\.image_size, got {found}") as info:
        load_data(DataSpec(name="imagefolder", root=str(tmp_path)))
    assert "\n" not in str(info.value) and "set data.image_size" in str(info.value)
    assert load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=5)).image_shape == (3, 5, 5)


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


def test_local_roots_with_broken_contents(tmp_path):
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(harden.DataError, match="expected the intact CIFAR-10 python batches"):
        load_data(tiny_policy(data={"name": "cifar10", "root": str(tmp_path / "cifar")}).data)
    for split in ("train", "test"):
        (tmp_path / "folders" / split).mkdir(parents=True)
    with pytest.raises(harden.DataError, match="expected class folders of images"):
        load_data(tiny_policy(data={"name": "imagefolder", "root": str(tmp_path / "folders")}).data)


@pytest.mark.parametrize(
    ("function", "match"),
    [
        (
            "bad_test_label",
            r"'helpers_data:bad_test_label' test split: expected labels in \[0, 2\], got 1 outside it .*first 3 at index 7",
        ),
        ("negative_label_no_array", r"test split: expected labels in \[0, 2\], got 1 outside it .*first -1 at index 4"),
        ("float_labels", r"train split: expected integer class labels, got torch.float32"),
        ("one_class", r"expected at least 2 classes in 'helpers_data:one_class', got 1"),
    ],
)
def test_every_label_of_every_split_is_checked_when_the_data_loads(helpers_on_path, function, match):
    with pytest.raises(harden.DataError, match=match) as info:
        load_data(DataSpec(name=f"helpers_data:{function}"))
    assert "\n" not in str(info.value)


def test_the_labels_a_test_limit_keeps_are_checked(helpers_on_path):
    # the bad label 3 is a class of its own: a balanced sample of 7 (>= 4 classes) keeps it, and it is refused
    with pytest.raises(harden.DataError, match=r"test split: expected labels in \[0, 2\], got 1 outside it"):
        load_data(DataSpec(name="helpers_data:bad_test_label", test_limit=7))


def test_labels_are_checked_from_the_label_array_without_loading_images(helpers_on_path):
    import helpers_data

    b = load_data(DataSpec(name="helpers_data:counting_targets"))
    assert (len(b.train), len(b.test), b.num_classes) == (60, 20, 3)
    # train example 0 for the image shape, then example 0 of each split for the pixel contract: 3 of 80
    assert helpers_data.CountingTargets.loads == 3


def test_mixed_image_sizes_are_one_line_naming_the_index(helpers_on_path):
    match = r"train image of .* shaped \(1, 8, 8\) like example 0, got \(1, 9, 9\) at index 5; resize"
    with pytest.raises(harden.DataError, match=match) as info:  # no label array: the label pass meets it
        load_data(DataSpec(name="helpers_data:mixed_sizes"))
    assert "\n" not in str(info.value)
    b = load_data(DataSpec(name="helpers_data:mixed_sizes_with_targets"))  # labels from targets: no image read
    with pytest.raises(harden.DataError, match=match) as info:
        list(make_loader(b.train, 4, shuffle=False))  # not a collate error: the image is refused as it loads
    assert "\n" not in str(info.value)
    with pytest.raises(harden.DataError, match=f"^expected every {match}") as info:
        list(make_loader(b.train, 4, shuffle=False, num_workers=2))
    assert "\n" not in str(info.value)


def test_a_corrupt_png_in_an_imagefolder_is_one_line_naming_the_file(tmp_path):
    make_image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    b = load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=8))
    for workers in (0, 2):  # from a worker process too: the one line, not torch's traceback
        with pytest.raises(harden.DataError, match=r"^expected an image file PIL can read") as info:
            list(make_loader(b.train, 2, shuffle=False, num_workers=workers))
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    first = tmp_path / "train" / "cat" / "0.png"
    first.write_bytes(b"not a png")
    with pytest.raises(harden.DataError, match="expected an image file PIL can read") as info:
        load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=8))  # example 0 is read at load
    assert str(first) in str(info.value)


def test_imagefolder_labels_come_from_its_targets(tmp_path, monkeypatch):
    from torchvision import datasets

    make_image_folder(tmp_path)
    loads = []
    original = datasets.ImageFolder.__getitem__
    monkeypatch.setattr(datasets.ImageFolder, "__getitem__", lambda self, i: loads.append(i) or original(self, i))
    load_data(DataSpec(name="imagefolder", root=str(tmp_path), image_size=8))
    assert loads == [0, 0]  # example 0 of train and of test (the pixel contract): labels need no image


def test_a_data_function_the_module_only_imported_is_refused_before_it_is_called(monkeypatch):
    import sys
    import types

    calls = []
    foreign = types.ModuleType("otherdata_h")
    exec("def load():\n    CALLS.append(1)\n    return None\n", foreign.__dict__)
    foreign.CALLS = calls
    monkeypatch.setitem(sys.modules, "otherdata_h", foreign)
    mine = types.ModuleType("mydata_h.loaders")
    exec("from otherdata_h import load\nimport os\n", mine.__dict__)
    monkeypatch.setitem(sys.modules, "mydata_h.loaders", mine)
    with pytest.raises(
        harden.DataError,
        match=r"^expected 'mydata_h\.loaders:load' to be defined in package "
        r"'mydata_h', got an object from 'otherdata_h'; name the code where it is defined$",
    ):
        load_data(DataSpec(name="mydata_h.loaders:load"))
    assert calls == []
    with pytest.raises(Exception, match=r"one public name"):  # a path through the module: not even validated
        DataSpec(name="mydata_h.loaders:os.getcwd")
