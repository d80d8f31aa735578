"""Smaller ONNX models: float16 and int8 copies of an exported model, re-measured through onnxruntime.

:func:`to_fp16` stores weights and activations as float16 (onnxruntime's float16 converter,
``keep_io_types=True``: the graph still takes float32 ``pixels`` and returns float32
``logits``). :func:`to_int8` quantizes weights to int8 and activations dynamically at run time
(``onnxruntime.quantization.quantize_dynamic`` after its ``quant_pre_process``). Both keep the
source's ``metadata_props`` and add ``precision``. A converted model computes different logits,
so its parity bound is looser than the float32 export's 1e-4 (:func:`logit_parity` measures it)
and its accuracy must be measured again: :func:`measure_converted` gives clean accuracy,
accuracy on given adversarial inputs (e.g. the float32 model's, i.e. transfer) and under random
noise in the threat model's ball, all through an onnxruntime CPU session. The measuring lives in
:mod:`harden.onnx_accuracy` (:func:`onnx_logits`, :func:`logit_parity`,
:func:`measure_converted`, :class:`ConvertedAccuracy`) and is importable from here too.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from harden.checkpoint import atomic_write
from harden.errors import ExportError
from harden.export import PRECISION_KEY
from harden.onnx_accuracy import ConvertedAccuracy, logit_parity, measure_converted, onnx_logits

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

    Args:
        onnx_path: the ``.onnx`` file.

    Returns:
        ``fp32``, ``fp16`` or ``int8``.

    Raises:
        ExportError: no such file, or not a readable ONNX model.

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
