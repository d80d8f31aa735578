"""harden.augment: random crop (zero padding) and horizontal flip, seeded, per example; its defaults."""

import logging

import pytest
import torch
import torch.nn.functional as F

import harden
from harden.augment import augment_batch, augment_enabled, crop_padding
from harden.distributed import Distributed
from harden.fit_setup import set_up
from harden.sources import DataSpec
from harden.testing import synthetic_bundle, tiny_policy


def reference(x, gen):
    """The augmentation one example at a time, drawing the same numbers in the same order."""
    n, _, h, w = x.shape
    ph, pw = crop_padding(h), crop_padding(w)
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = []
    for i in range(n):
        padded = F.pad(x[i], (pw, pw, ph, ph))
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out), dy, dx, flip


def test_crop_and_flip_match_a_per_example_reference():
    x = torch.rand(16, 3, 32, 32)
    got = augment_batch(x, torch.Generator().manual_seed(3))
    want, dy, dx, flip = reference(x, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    # 16 draws of offsets in 0..8 and flips: the batch is not left as it was, nor all alike
    assert flip.any() and not flip.all()
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 1


def test_a_hand_made_image_is_shifted_with_zeros_and_mirrored():
    x = (torch.arange(64, dtype=torch.float32) + 1).reshape(1, 1, 8, 8) / 64  # pad 1: offsets 0..2
    seen = set()
    for seed in range(40):
        out = augment_batch(x, torch.Generator().manual_seed(seed))[0, 0]
        _, dy, dx, flip = reference(x, torch.Generator().manual_seed(seed))
        sy, sx, f = int(dy[0]) - 1, int(dx[0]) - 1, bool(flip[0])  # shift of the content, in -1..1
        img = out.flip(-1) if f else out  # undo the mirror
        for r in range(8):
            for c in range(8):
                src_r, src_c = r + sy, c + sx
                inside = 0 <= src_r < 8 and 0 <= src_c < 8
                assert img[r, c] == (x[0, 0, src_r, src_c] if inside else 0.0)
        seen.add((sy, sx, f))
    assert len(seen) > 6  # the draws cover shifts both ways and both flips


def test_shape_dtype_range_and_determinism():
    x = torch.rand(7, 1, 28, 20, dtype=torch.float64)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= x.max()
    assert x.data_ptr() != a.data_ptr()  # a new tensor: the input is untouched


def test_the_generator_moves_on_between_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    assert not torch.equal(augment_batch(x, gen), augment_batch(x, gen))


def test_padding_is_an_eighth_of_the_side():
    assert [crop_padding(s) for s in (8, 28, 32, 64, 224)] == [1, 4, 4, 8, 28]


def test_a_non_batch_is_a_data_error():
    with pytest.raises(harden.DataError, match=r"expected a batch of images \(N, C, H, W\) to augment, got shape"):
        augment_batch(torch.rand(3, 8, 8), torch.Generator())


@pytest.mark.parametrize(
    ("name", "augment", "expected"),
    [
        ("cifar10", None, True),
        ("imagefolder", None, True),
        ("digits", None, False),
        ("mnist-5k", None, False),
        ("synthetic", None, False),
        ("cifar10", False, False),
        ("digits", True, True),
    ],
)
def test_augment_enabled_defaults_and_explicit_values(name, augment, expected):
    assert augment_enabled(DataSpec(name=name, augment=augment)) is expected


def test_fit_augments_when_asked_and_says_so(tmp_path, caplog):
    b = synthetic_bundle(96, 32)
    dist = Distributed(torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="harden"):
        on = set_up(None, tiny_policy(data={"augment": True}), dist, b.train, b.test, b, tmp_path)
    said = [r.getMessage() for r in caplog.records if "augmenting" in r.getMessage()]
    assert said == ["augmenting training batches: random crop (zero padding 1 px) and horizontal flip"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="harden"):
        off = set_up(None, tiny_policy(), dist, b.train, b.test, b, tmp_path)
    assert on.augment and not off.augment
    assert not [r for r in caplog.records if "augmenting" in r.getMessage()]
