"""Smaller ONNX models: float16 and int8 copies of an exported model, re-measured through onnxruntime.

:func:`to_fp16` stores weights and activations as float16 (onnxruntime's float16 converter,
``keep_io_types=True``: the graph still takes float32 ``pixels`` and returns float32
``logits``). :func:`to_int8` quantizes weights to int8 and activations dynamically at run time
(``onnxruntime.quantization.quantize_dynamic`` after its ``quant_pre_process``). Both keep the
source's ``metadata_props`` and add ``precision``. A converted model computes different logits,
so its parity bound is looser than the float32 export's 1e-4 (:func:`logit_parity` measures it)
and its accuracy must be measured again: :func:`measure_converted` gives clean accuracy,
accuracy on given adversarial inputs (e.g. the float32 model's, i.e. transfer) and under random
noise in the threat model's ball, all through an onnxruntime CPU session.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from harden.checkpoint import atomic_write
from harden.errors import ExportError
from harden.export import INPUT_NAME, OUTPUT_NAME
from harden.policy import ThreatModel

__all__ = [
    "PRECISION_KEY",
    "ConvertedAccuracy",
    "logit_parity",
    "measure_converted",
    "onnx_logits",
    "onnx_precision",
    "to_fp16",
    "to_int8",
]

#: The ``metadata_props`` key naming a converted model's precision (``fp16`` or ``int8``).
PRECISION_KEY = "precision"


def _load(path: str | Path) -> Any:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"expected an ONNX file, got {str(path)!r} (no such file)")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"expected a readable ONNX model at {str(path)!r}, got {type(exc).__name__}: {exc}") from None


def _metadata(proto: Any) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _source_metadata(proto: Any, path: str | Path) -> dict[str, str]:
    meta = _metadata(proto)
    if meta.get(PRECISION_KEY, "fp32") != "fp32":
        raise ExportError(
            f"expected a float32 model at {str(path)!r}, got one already converted to {meta[PRECISION_KEY]}"
        )
    return meta


def _finish(proto: Any, meta: dict[str, str], precision: str, out_path: str | Path) -> Path:
    """Write ``meta`` + ``precision`` into ``proto``, check it and write it atomically."""
    import onnx

    del proto.metadata_props[:]
    for k, v in {**meta, PRECISION_KEY: precision}.items():
        proto.metadata_props.add(key=k, value=v)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"expected a valid {precision} ONNX graph, got onnx.checker: {exc}") from None
    out = Path(out_path)
    atomic_write(out, proto.SerializeToString())
    return out


def onnx_precision(onnx_path: str | Path) -> str:
    """The ``precision`` metadata of a model (``fp32`` for harden's plain export).

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = export_onnx(TinyCNN(num_classes=3), tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> onnx_precision(tmp / "m.onnx")
        'fp32'
    """
    return _metadata(_load(onnx_path)).get(PRECISION_KEY, "fp32")


def to_fp16(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Convert a float32 ONNX classifier to float16 weights and activations.

    Inputs and outputs stay float32 (``keep_io_types=True``), so callers feed the same
    ``pixels`` and read the same ``logits``; onnxruntime's default block list keeps a few ops in
    float32. Expect max logit differences around 1e-3 of the logit scale against float32.

    Args:
        onnx_path: the float32 model (e.g. from :func:`harden.export_onnx`).
        out_path: where to write the float16 model (atomically).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: the source is missing, not float32, or the converted graph is invalid.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = export_onnx(TinyCNN(num_classes=3), tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> path = to_fp16(tmp / "m.onnx", tmp / "m-fp16.onnx")
        >>> onnx_precision(path)
        'fp16'
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = _load(onnx_path)
    meta = _source_metadata(proto, onnx_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half = convert_float_to_float16(proto, keep_io_types=True)
        # the converter appends the Casts of the kept float32 inputs at the end of the graph
        OnnxModel.graph_topological_sort(half.graph)
    except Exception as exc:
        raise ExportError(f"expected the model to convert to float16, got {type(exc).__name__}: {exc}") from None
    return _finish(half, meta, "fp16", out_path)


def to_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    weight_type: Literal["qint8", "quint8"] = "qint8",
    per_channel: bool = False,
) -> Path:
    """Quantize a float32 ONNX classifier dynamically: int8 weights, activations quantized at run time.

    Runs onnxruntime's ``quant_pre_process`` (symbolic shape inference and graph optimization;
    skipped with a warning if it fails on the graph), then ``quantize_dynamic`` (Conv, MatMul and
    Gemm become integer ops). Inputs and outputs stay float32.

    Args:
        onnx_path: the float32 model (e.g. from :func:`harden.export_onnx`).
        out_path: where to write the int8 model (atomically).
        weight_type: ``qint8`` (signed) or ``quint8`` (unsigned) weights.
        per_channel: one scale per output channel instead of per tensor.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: the source is missing, not float32, ``weight_type`` is unknown, or the
            quantization or the quantized graph failed.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = export_onnx(TinyCNN(num_classes=3), tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> path = to_int8(tmp / "m.onnx", tmp / "m-int8.onnx")
        >>> onnx_precision(path)
        'int8'
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
    if weight_type not in types:
        raise ExportError(f"expected weight_type 'qint8' or 'quint8', got {weight_type!r}")
    src = Path(onnx_path)
    proto = _load(src)
    meta = _source_metadata(proto, src)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        pre = tmp / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(pre))
        except Exception as exc:
            warnings.warn(
                f"onnxruntime's quant_pre_process failed ({type(exc).__name__}: {str(exc)[:200]}); quantizing the graph as it is",
                RuntimeWarning,
                stacklevel=2,
            )
            # stale value_info would clash with the shapes the quantizer infers for its new nodes
            del proto.graph.value_info[:]
            pre = tmp / "plain.onnx"
            pre.write_bytes(proto.SerializeToString())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(
                    str(pre), str(tmp / "int8.onnx"), weight_type=types[weight_type], per_channel=per_channel
                )
        except Exception as exc:
            raise ExportError(f"expected the model to quantize to int8, got {type(exc).__name__}: {exc}") from None
        quantized = _load(tmp / "int8.onnx")
    return _finish(quantized, meta, "int8", out)


def _session(onnx_path: str | Path) -> Any:
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"expected an ONNX file, got {str(path)!r} (no such file)")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(
            f"expected onnxruntime's CPUExecutionProvider to load {str(path)!r}, got {type(exc).__name__}: {str(exc)[:300]}"
        ) from None


def _run(sess: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    xs = x.detach().to("cpu", torch.float32).numpy()
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: xs[i : i + batch_size]})[0] for i in range(0, len(xs), batch_size)]
    return torch.from_numpy(np.concatenate(outs).astype(np.float32, copy=False))


def onnx_logits(onnx_path: str | Path, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Float32 logits of an ONNX classifier on pixels ``x`` (onnxruntime, CPU), as a CPU tensor.

    Example:
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> from harden.export import export_onnx
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = export_onnx(TinyCNN(num_classes=3), tmp / "m.onnx", input_shape=(1, 8, 8))
        >>> onnx_logits(tmp / "m.onnx", torch.rand(5, 1, 8, 8)).shape
        torch.Size([5, 3])
    """
    return _run(_session(onnx_path), x, batch_size)


@torch.no_grad()
def logit_parity(onnx_path: str | Path, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max abs logit difference, argmax agreement) of an ONNX model against a torch model.

    ``x`` must be on the model's device; the model runs in eval mode and its modes are restored.

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
    return float((got - ref).abs().max()), float((got.argmax(1) == ref.argmax(1)).float().mean())


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
    sess = _session(onnx_path)
    x = x.detach().to("cpu", torch.float32)
    y = y.detach().cpu()

    def acc(inputs: torch.Tensor) -> float:
        return float((_run(sess, inputs, batch_size).argmax(1) == y).float().mean())

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
