"""Re-measuring an ONNX classifier through onnxruntime: logits, parity with torch, accuracy.

A float16 or int8 copy (:mod:`harden.quantize`) computes different logits, so its parity bound is
looser than the float32 export's 1e-4 (:func:`logit_parity` measures it) and its accuracy must be
measured again: :func:`measure_converted` gives clean accuracy, accuracy on given adversarial
inputs (e.g. the float32 model's, i.e. transfer) and under random noise in the threat model's
ball, all through an onnxruntime CPU session (:func:`harden.runtime.build_session`). The names
are also importable from :mod:`harden.quantize`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harden.batches import predictions
from harden.errors import ExportError
from harden.export import INPUT_NAME, OUTPUT_NAME, PRECISION_KEY
from harden.policy import ThreatModel
from harden.runtime import build_session

__all__ = ["ConvertedAccuracy", "logit_parity", "measure_converted", "onnx_logits"]


def _run(sess: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    xs = x.detach().to("cpu", torch.float32).numpy()
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: xs[i : i + batch_size]})[0] for i in range(0, len(xs), batch_size)]
    return torch.from_numpy(np.concatenate(outs).astype(np.float32, copy=False))


def onnx_logits(onnx_path: str | Path, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Float32 logits of an ONNX classifier on pixels ``x`` (onnxruntime, CPU), as a CPU tensor.

    Args:
        onnx_path: the model (float32, float16 or int8; float32 ``pixels`` in, ``logits`` out).
        x: NCHW pixels on any device (copied to the CPU as float32).
        batch_size: rows per onnxruntime call.

    Returns:
        ``(N, num_classes)`` float32 logits on the CPU.

    Raises:
        ExportError: no such file, or not a model onnxruntime can load.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = export_onnx(TinyCNN(num_classes=3), tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> onnx_logits(tmp / "m.onnx", torch.rand(5, 1, 8, 8)).shape
        torch.Size([5, 3])
    """
    return _run(build_session(onnx_path, "cpu")[0], x, batch_size)


@torch.no_grad()
def logit_parity(onnx_path: str | Path, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max abs logit difference, argmax agreement) of an ONNX model against a torch model.

    Args:
        onnx_path: the ONNX model, run by onnxruntime on the CPU.
        model: the torch model; it runs in eval mode and its modes are restored.
        x: pixels on the model's device.

    Returns:
        ``(max |onnx logit - torch logit|, fraction of rows with the same argmax)``.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> net = TinyCNN(num_classes=3).eval()
        >>> _ = export_onnx(net, tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> diff, agree = logit_parity(tmp / "m.onnx", net, torch.rand(16, 1, 8, 8))
        >>> diff <= 1e-4, agree
        (True, 1.0)
    """
    from harden.attacks.base import restore_modes, save_modes

    modes = save_modes(model)
    model.eval()
    try:
        ref = model(x).detach().float().cpu()
    finally:
        restore_modes(model, modes)
    got = onnx_logits(onnx_path, x)
    return float((got - ref).abs().max()), float((predictions(got) == predictions(ref)).float().mean())


class _OrtModule(nn.Module):
    """An onnxruntime session as a (gradient-free, CPU) ``nn.Module``, for black-box attacks."""

    def __init__(self, sess: Any, batch_size: int) -> None:
        super().__init__()
        self.sess = sess
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from onnxruntime."""
        return _run(self.sess, x, self.batch_size)


@dataclass
class ConvertedAccuracy:
    """Accuracy of an ONNX model re-measured through onnxruntime (see :func:`measure_converted`).

    Attributes:
        path: the model file.
        precision: its ``precision`` metadata (``fp32``, ``fp16``, ``int8``).
        n: examples.
        clean_accuracy: accuracy on the clean inputs.
        transfer_accuracy: accuracy on the given adversarial inputs (None when none were given).
        noise_accuracy: accuracy under the worst of ``noise_samples`` Gaussian draws projected
            onto the threat model's ball (None when ``noise_samples`` is 0).
        noise_samples: Gaussian draws per example.
        threat: the threat model.
        seconds: wall time.
    """

    path: Path
    precision: str
    n: int
    clean_accuracy: float
    transfer_accuracy: float | None
    noise_accuracy: float | None
    noise_samples: int
    threat: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _check_measure_inputs(x: Any, y: Any, threat: Any, adversarial: Any, noise_samples: Any) -> None:
    """Raise :class:`ExportError` unless :func:`measure_converted`'s inputs fit together."""
    if not isinstance(threat, ThreatModel):
        raise ExportError(f"expected a harden.ThreatModel, got {type(threat).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] == 0:
        raise ExportError(f"expected x as a non-empty NCHW batch, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ExportError(f"expected y as {x.shape[0]} integer labels, got {getattr(y, 'shape', type(y).__name__)}")
    if adversarial is not None and (not isinstance(adversarial, torch.Tensor) or adversarial.shape != x.shape):
        raise ExportError(
            f"expected adversarial with the shape of x {tuple(x.shape)}, got {getattr(adversarial, 'shape', adversarial)}"
        )
    if isinstance(noise_samples, bool) or not isinstance(noise_samples, int) or noise_samples < 0:
        raise ExportError(f"expected noise_samples as an integer >= 0, got {noise_samples!r}")


def measure_converted(
    onnx_path: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    adversarial: torch.Tensor | None = None,
    noise_samples: int = 10,
    seed: int = 0,
    batch_size: int = 256,
) -> ConvertedAccuracy:
    """Clean, transfer and noise accuracy of an ONNX model, all through an onnxruntime CPU session.

    This is the honest minimum after a conversion: white-box attacks need gradients the
    converted graph does not give, so robustness is re-measured on inputs computed elsewhere
    (``adversarial``: e.g. the float32 model's adversarial examples, which transfer) and on
    random noise inside the threat model (the suite's ``noise`` attack run against the session).
    Run it on the float32 export too and compare.

    Args:
        onnx_path: the model (float32, float16 or int8).
        x: clean pixels in [0, 1], NCHW float32.
        y: integer labels, one per row of ``x``.
        threat: the threat model of the noise (``norm``, ``eps``).
        adversarial: an adversarial counterpart of each row of ``x`` (same shape), or None.
        noise_samples: Gaussian draws per example (0: skip the noise measurement).
        seed: seeds the noise without touching the global RNG.
        batch_size: rows per onnxruntime call.

    Returns:
        A :class:`ConvertedAccuracy`.

    Raises:
        ExportError: the file cannot run on the CPU provider, or the inputs do not match.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = export_onnx(TinyCNN(num_classes=3), tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
        >>> acc = measure_converted(tmp / "m.onnx", x, y, ThreatModel(eps=0.1), adversarial=x)
        >>> acc.transfer_accuracy == acc.clean_accuracy, acc.precision
        (True, 'fp32')
    """
    from harden.attacks.noise import GaussianNoise

    t0 = time.perf_counter()
    _check_measure_inputs(x, y, threat, adversarial, noise_samples)
    sess = build_session(onnx_path, "cpu")[0]
    x = x.detach().to("cpu", torch.float32)
    y = y.detach().cpu()

    def acc(inputs: torch.Tensor) -> float:
        return float((predictions(_run(sess, inputs, batch_size)) == y).float().mean())  # NaN rows: wrong

    clean = acc(x)
    transfer = acc(adversarial) if adversarial is not None else None
    noise = None
    if noise_samples:
        attack = GaussianNoise(threat, {"samples": noise_samples})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            noise = acc(attack(_OrtModule(sess, batch_size), x, y))
    precision = sess.get_modelmeta().custom_metadata_map.get(PRECISION_KEY, "fp32")
    return ConvertedAccuracy(
        path=Path(onnx_path),
        precision=precision,
        n=int(x.shape[0]),
        clean_accuracy=clean,
        transfer_accuracy=transfer,
        noise_accuracy=noise,
        noise_samples=noise_samples,
        threat=threat.model_dump(mode="json"),
        seconds=time.perf_counter() - t0,
    )
