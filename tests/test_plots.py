"""harden.plots: the certificate's PNG plots, drawn only from the data that is there, deterministic."""

from __future__ import annotations

import ast
import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

import harden.plots
from harden.certificate import Certificate, SaliencyExample, SmoothingSummary
from harden.plots import _as_image, certificate_plots

BASE = {
    "verdict": "EMPIRICAL",
    "created": "2025-01-01T00:00:00+00:00",
    "policy_name": "demo",
    "policy_sha256": "ab" * 32,
    "weights_sha256": "cd" * 32,
    "threat": {"norm": "linf", "eps": 0.1},
    "n": 10,
    "clean_accuracy": 0.9,
    "robust_accuracy": 0.6,
    "per_attack": {"pgd": 0.6},
    "attacks": [{"name": "pgd"}],
    "seed": 0,
    "device": "cpu",
    "versions": {},
}
SMOOTHING = SmoothingSummary(
    sigma=0.25,
    n0=10,
    n=50,
    alpha=0.001,
    examples=2,
    abstentions=0,
    radius=0.1,
    certified_accuracy=0.5,
    min_certified_accuracy=0.4,
    curve=[(0.0, 0.8), (0.1, 0.5)],
    labels=[0, 1],
    predictions=[0, 1],
    radii=[0.2, 0.05],
    seconds=1.0,
    samples_per_second=120.0,
)
HISTORY = [
    {"epoch": 1, "train_loss": 0.9, "val_clean_acc": 0.7, "val_pgd_acc": 0.3},
    {"epoch": 2, "train_loss": 0.4, "val_clean_acc": 0.9},
]


def _saliency(channels: tuple[int, ...]) -> list[SaliencyExample]:
    rng = np.random.default_rng(0)
    return [
        SaliencyExample(
            label=i,
            prediction=i,
            image=rng.random((c, 6, 6)).tolist(),
            maps={"hardened": rng.random((6, 6)).tolist(), **({"baseline": rng.random((6, 6)).tolist()} if i else {})},
        )
        for i, c in enumerate(channels)
    ]


def _decode(img: str) -> Image.Image:
    m = re.fullmatch(r'<img class="plot" alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', img)
    assert m, img[:80]
    return Image.open(io.BytesIO(base64.b64decode(m.group(1))))


def test_no_data_no_plots():
    assert certificate_plots(Certificate(**BASE), "eps = 0.1") == {}
    bare_smoothing = SMOOTHING.model_copy(update={"curve": []})
    assert certificate_plots(Certificate(**BASE, smoothing=bare_smoothing), "eps = 0.1") == {}


def test_every_plot_when_its_data_is_there():
    cert = Certificate(
        **BASE,
        eps_curve=[(0.0, 0.9), (0.1, 0.6)],
        smoothing=SMOOTHING,
        training=HISTORY,
        saliency=_saliency((1, 3)),
    )
    plots = certificate_plots(cert, "eps = 0.1")
    assert list(plots) == ["eps", "smoothing", "training", "saliency"]
    sizes = {key: _decode(img).size for key, img in plots.items()}
    assert sizes["eps"] == sizes["smoothing"] == (600, 340)
    assert sizes["training"] == (1000, 340)
    assert sizes["saliency"] == (570, 410)  # 1 + 2 maps wide, 2 examples high, 1.9 in each at 100 dpi
    assert certificate_plots(cert, "eps = 0.1") == plots, "the PNG bytes are a function of the data"
    assert certificate_plots(cert, "eps = 0.2")["eps"] != plots["eps"], "the threat is in the title"


def test_as_image_shapes_and_clipping():
    grey = _as_image([[[-1.0, 0.5], [2.0, 0.25]]])
    assert grey.shape == (2, 2) and grey.dtype == np.float32
    assert grey.tolist() == [[0.0, 0.5], [1.0, 0.25]]
    rgb = _as_image(np.arange(12, dtype=float).reshape(3, 2, 2).tolist())
    assert rgb.shape == (2, 2, 3) and rgb.max() == 1.0
    assert _as_image(np.full((2, 2, 2), 0.5).tolist()).shape == (2, 2)  # 2 channels: their mean


def test_plots_imports_only_numpy_matplotlib_and_the_stdlib_at_run_time():
    """Not harden.report (which imports plots) nor harden.certificate (only under TYPE_CHECKING)."""
    tree = ast.parse(Path(harden.plots.__file__).read_text())
    type_checking = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    guarded = {id(n) for n in ast.walk(type_checking)}
    runtime = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in guarded
        for a in n.names
    }
    assert {m.split(".")[0] for m in runtime if m} <= {"__future__", "base64", "io", "typing", "numpy", "matplotlib"}


def _has(img: Image.Image, rgb: tuple[int, int, int]) -> bool:
    return rgb in {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20) or []}


RED, BLUE, ORANGE = (0xCF, 0x22, 0x2E), (0x09, 0x69, 0xDA), (0xBC, 0x4C, 0x00)


def test_eps_plot_marks_the_threat_eps_and_draws_bands_and_the_baseline():
    from harden.certificate import BaselineSummary

    curve = [(0.0, 0.9), (0.05, 0.7), (0.1, 0.6), (0.2, 0.3)]
    bands = [(0.6, 1.0), (0.4, 0.9), (0.3, 0.85), (0.1, 0.6)]
    cert = Certificate(**BASE, eps_curve=curve, eps_intervals=bands, check_n=10)
    img = _decode(certificate_plots(cert, "eps = 0.1")["eps"])
    assert img.size == (600, 340)
    assert _has(img, BLUE) and _has(img, RED)  # the model's line; the threat's eps (dashed, red)
    assert not _has(img, ORANGE)  # no baseline, no second line
    no_eps = cert.model_copy(update={"threat": {"norm": "linf", "eps": None}})
    assert not _has(_decode(certificate_plots(no_eps, "eps = 0.1")["eps"]), RED)
    # the band is drawn: without it the plot differs
    assert certificate_plots(cert.model_copy(update={"eps_intervals": []}), "eps = 0.1") != certificate_plots(
        cert, "eps = 0.1"
    )
    base = BaselineSummary(n=10, clean_accuracy=0.9, robust_accuracy=0.0, per_attack={"pgd": 0.0},
                           eps_curve=[(0.0, 0.9), (0.05, 0.2), (0.1, 0.0), (0.2, 0.0)])  # fmt: skip
    both = _decode(certificate_plots(cert.model_copy(update={"baseline": base}), "eps = 0.1")["eps"])
    assert _has(both, ORANGE) and _has(both, BLUE) and both.size == (600, 340)
