"""``harden.plots``: the PNG plots of the HTML certificate (matplotlib, Agg canvas, inline ``<img>``).

:func:`certificate_plots` draws, from a :class:`~harden.certificate.Certificate`, each plot its
data allows (accuracy vs eps, certified accuracy vs l2 radius, training curves, saliency maps),
as ``<img>`` tags with the PNG inlined as a ``data:`` URI; :mod:`harden.report` places them. The
Agg canvas and PNG metadata without a software stamp make the bytes a function of the data.
This module needs only numpy and matplotlib: it names the certificate in annotations only.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from harden.certificate import Certificate, SaliencyExample

__all__ = ["certificate_plots"]


def certificate_plots(cert: Certificate, threat: str) -> dict[str, str]:
    """Inline ``<img>`` plots of ``cert``, each when its data is there.

    Args:
        cert: the certificate.
        threat: the threat model as text, for the title of the accuracy-vs-eps plot.

    Returns:
        ``<img>`` tags by key: ``eps`` (accuracy vs eps, with 95% Wilson bands, the undefended
        baseline when there is one, and the threat's eps marked), ``smoothing`` (certified accuracy vs l2
        radius), ``training`` (loss and accuracy per epoch), ``saliency`` (images and their maps).

    Example:
        >>> from harden.certificate import Certificate
        >>> cert = Certificate(verdict="EMPIRICAL", created="2025-01-01T00:00:00+00:00", policy_name="demo",
        ...     policy_sha256="ab" * 32, weights_sha256="cd" * 32, threat={"norm": "linf", "eps": 0.1}, n=200,
        ...     clean_accuracy=0.98, robust_accuracy=0.965, per_attack={"pgd": 0.965}, attacks=[{"name": "pgd"}],
        ...     seed=0, device="cpu", versions={}, eps_curve=[(0.0, 0.98), (0.1, 0.965)])
        >>> plots = certificate_plots(cert, "norm = linf, eps = 0.1")
        >>> list(plots), plots["eps"].startswith('<img class="plot" alt="plot" src="data:image/png;base64,')
        (['eps'], True)
    """
    out: dict[str, str] = {}
    if cert.eps_curve:
        out["eps"] = _eps_plot(cert, threat)
    if cert.smoothing is not None and cert.smoothing.curve:
        curve = [(float(r), float(a)) for r, a in cert.smoothing.curve]
        title = f"smoothed classifier, sigma = {cert.smoothing.sigma:g}"
        out["smoothing"] = _line_plot(curve, "l2 radius", "certified accuracy (%)", title)
    if cert.training:
        out["training"] = _training_plot(cert.training)
    if cert.saliency:
        out["saliency"] = _saliency_plot(cert.saliency)
    return out


def _png(fig: Figure) -> str:
    """The figure as an inline ``<img>`` (PNG, base64)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="plot" src="data:image/png;base64,{data}">'


def _line_plot(points: list[tuple[float, float]], xlabel: str, ylabel: str, title: str) -> str:
    """A line plot of ``(x, fraction)`` points, the fractions shown in percent."""
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", color="#0969da")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-2, 102))
    ax.grid(alpha=0.3)
    return _png(fig)


def _eps_plot(cert: Certificate, threat: str) -> str:
    """Accuracy vs eps: the model (95% Wilson band), the undefended baseline, the threat's eps marked."""
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    curves = [("hardened model", "#0969da", cert.eps_curve, cert.eps_intervals)]
    if cert.baseline is not None and cert.baseline.eps_curve:
        curves.append(("undefended baseline", "#bc4c00", cert.baseline.eps_curve, cert.baseline.eps_intervals))
    for label, colour, curve, bands in curves:
        xs = [float(e) for e, _ in curve]
        ax.plot(xs, [100 * float(a) for _, a in curve], marker="o", color=colour, label=label)
        if len(bands) == len(curve):
            lo, hi = ([100 * float(b[i]) for b in bands] for i in (0, 1))
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, linewidth=0)
    eps = cert.threat.get("eps")
    if isinstance(eps, int | float) and not isinstance(eps, bool):
        ax.axvline(float(eps), color="#cf222e", linestyle="--", linewidth=1, label=f"threat eps = {float(eps):g}")
    ax.set(xlabel="eps", ylabel="accuracy (%)", title=f"robust accuracy vs eps ({threat})", ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _training_plot(history: list[dict[str, Any]]) -> str:
    """Training curves per epoch: the losses on the left, the accuracies (in percent) on the right."""
    epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(history)]
    keys = list(dict.fromkeys(k for r in history for k in r))
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    for ax, pick, ylabel in zip(
        fig.subplots(1, 2), (lambda k: "loss" in k, lambda k: k.endswith("_acc")), ("loss", "accuracy (%)"), strict=True
    ):
        for key in filter(pick, keys):
            pts = [
                (e, float(r[key])) for e, r in zip(epochs, history, strict=True) if isinstance(r.get(key), int | float)
            ]
            scale = 100 if ylabel != "loss" else 1
            ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], marker="o", label=key)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"training {ylabel.split()[0]}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(fig)


def _as_image(image: list[list[list[float]]]) -> np.ndarray:
    """A CHW image as something ``imshow`` takes: HWC for 3 channels, else the channel mean (HW)."""
    arr = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if arr.ndim == 3 and arr.shape[0] == 3:
        return arr.transpose(1, 2, 0)
    return arr.mean(0) if arr.ndim == 3 else arr


def _saliency_plot(examples: list[SaliencyExample]) -> str:
    """One row per example: the image, then each of its saliency maps."""
    names = list(dict.fromkeys(k for ex in examples for k in ex.maps))
    cols = 1 + len(names)
    fig = Figure(figsize=(1.9 * cols, 1.9 * len(examples) + 0.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(examples), cols, squeeze=False))
    for row, ex in zip(axes, examples, strict=True):
        row[0].imshow(_as_image(ex.image), cmap="gray", vmin=0, vmax=1)
        row[0].set_title(f"label {ex.label} / pred {ex.prediction}", fontsize=9)
        for ax, name in zip(row[1:], names, strict=True):
            if name in ex.maps:
                ax.imshow(np.asarray(ex.maps[name], dtype=np.float32), cmap="inferno", vmin=0, vmax=1)
            ax.set_title(name, fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return _png(fig)
