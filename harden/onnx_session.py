"""The one place harden creates onnxruntime sessions, and finds out which provider actually runs.

:func:`build_session` is used by :func:`harden.load_onnx`, by :func:`harden.export_onnx`'s
parity test and by :mod:`harden.quantize`. onnxruntime-gpu lists ``CUDAExecutionProvider``
even on a machine without a GPU or without the CUDA/cuDNN libraries, and then silently runs on
the CPU; harden always reads ``session.get_providers()`` after creating the session:

- ``device="cpu"``: ``CPUExecutionProvider`` only.
- ``device="cuda"``: ``CUDAExecutionProvider`` (device 0) with the CPU as onnxruntime's fallback
  for unsupported nodes; :class:`harden.errors.ExportError` with onnxruntime's own reason (its
  log, captured while the session is created) when CUDA does not run.
- ``device="auto"``: CUDA when onnxruntime lists it and it runs, else the CPU; the reason for a
  fallback is returned.

TensorRT is opt-in: with the environment variable ``HARDEN_TRT=1`` (and
``TensorrtExecutionProvider`` available), ``cuda``/``auto`` put it first. TensorRT builds an
engine per input shape, which takes minutes, so it is off by default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harden.errors import ExportError

__all__ = ["CPU", "CUDA", "DEVICES", "TRT", "build_session", "providers_for", "short_reason"]

log = logging.getLogger("harden")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def providers_for(device: str, available: list[str] | None = None, *, trt: bool | None = None) -> list[str]:
    """The providers harden asks onnxruntime for, in priority order (what runs may differ).

    Args:
        device: ``auto``, ``cuda`` or ``cpu``.
        available: ``onnxruntime.get_available_providers()`` (default: asked).
        trt: put TensorRT first when available (default: the environment has ``HARDEN_TRT=1``).

    Returns:
        Provider names, the first preferred.

    Raises:
        ExportError: an unknown ``device``.

    Example:
        >>> providers_for("cpu")
        ['CPUExecutionProvider']
        >>> providers_for("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], trt=False)
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
        >>> providers_for("auto", ["CPUExecutionProvider"])
        ['CPUExecutionProvider']
    """
    if device not in DEVICES:
        raise ExportError(f"expected device 'auto', 'cuda' or 'cpu', got {device!r}")
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if device == "cpu" or (device == "auto" and CUDA not in available):
        return [CPU]
    trt = os.environ.get("HARDEN_TRT", "") == "1" if trt is None else trt
    return ([TRT] if trt and TRT in available else []) + [CUDA, CPU]


# ---------------------------------------------------------------- onnxruntime's log, captured
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMP = re.compile(r"^\S+ \S+ \[[A-Z]:onnxruntime:[^\]]*\]\s*")
_LIB_PATH = re.compile(r"/\S*/(lib[\w.+-]+\.so[\w.]*)")
_SRC = re.compile(r"/onnxruntime_src/\S+:\d+\s*")
_RELEVANT = re.compile(r"cuda|cudnn|tensorrt|nvinfer|gpu|EP Error", re.IGNORECASE)
_FAILURE = re.compile(r"fail|error|require|cannot|not found|no such", re.IGNORECASE)


def _reasons(text: str) -> list[str]:
    """The lines of onnxruntime's log that say why a GPU provider did not start, shortened."""
    out: list[str] = []
    python_layer: list[str] = []  # "EP Error ..." from onnxruntime's Python layer: a fallback
    for raw in text.splitlines():
        line = _STAMP.sub("", _ANSI.sub("", raw)).strip().strip("*").strip()
        if "FAIL : " in line:
            line = line.split("FAIL : ", 1)[1]
        line = _SRC.sub("", _LIB_PATH.sub(r"\1", line))
        if not line or not _RELEVANT.search(line) or not _FAILURE.search(line):
            continue
        bucket = python_layer if line.startswith("EP Error") else out
        if line not in bucket:
            bucket.append(line[:300])
    return out or python_layer[:1]


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Capture stdout/stderr, native ones included, into the yielded list (filled on exit).

    onnxruntime's C++ logger writes provider failures to file descriptor 2 and its Python layer
    prints "EP Error" to stdout; both are captured so that they can go into an error message
    instead of the terminal. Only used around session creation.
    """
    lines: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no usable file descriptors (an embedded interpreter): capture nothing
        yield lines
        return
    py_out = io.StringIO()
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(py_out):
                yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())
            lines.extend(py_out.getvalue().splitlines())


def short_reason(text: str, limit: int = 150) -> str:
    r"""The first line of a reason, cut to ``limit`` characters: a provider failure, for a terminal.

    The full reason stays where it is recorded (``OnnxClassifier.fallback_reason``, the reports).

    Example:
        >>> short_reason("CUDA failed: libcudnn.so.9 not found\nmore ...", limit=20)
        'CUDA failed: libc...'
    """
    first = text.strip().splitlines()[0].strip() if text.strip() else "no reason given"
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _no_cuda_reason(log_lines: list[str], available: list[str]) -> str:
    """Why CUDA does not run, in one line: onnxruntime's log, else what harden can tell."""
    import onnxruntime as ort

    if CUDA not in available:
        return (
            f"onnxruntime {ort.__version__} has no CUDA provider (available: {available}); "
            "install onnxruntime-gpu instead of onnxruntime"
        )
    parts = _reasons("\n".join(log_lines))
    if not torch.cuda.is_available():
        parts.append("torch sees no CUDA device either")
    if not parts:
        parts.append("onnxruntime gave no reason")
    text = "; ".join(parts)
    return text if len(text) <= 900 else text[:897] + "..."


def _create(
    source: str | bytes, where: str, providers: list[str], threads: int | None, tf32: bool
) -> tuple[Any, list[str]]:
    """An ``InferenceSession`` and, for GPU providers, onnxruntime's captured log lines.

    The CUDA provider gets ``use_tf32`` from ``tf32``: onnxruntime's default (on) rounds the
    inputs of float32 convolutions and matrix products to TensorFloat-32 (10-bit mantissa) on
    Ampere and later GPUs, which moves logits by about 1e-3 of their scale.
    """
    import onnxruntime as ort

    entries: list[Any] = [
        (CUDA, {"device_id": "0", "use_tf32": "1" if tf32 else "0"}) if p == CUDA else p for p in providers
    ]
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    ctx: contextlib.AbstractContextManager[list[str]] = (
        _captured_output() if providers != [CPU] else contextlib.nullcontext([])
    )
    try:
        with ctx as lines:
            sess = ort.InferenceSession(source, sess_options=opts, providers=entries)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"expected an ONNX model onnxruntime can load {where}, got {first}") from None
    return sess, list(lines)


def _source(model: str | Path | bytes) -> tuple[str | bytes, str, str]:
    """(what onnxruntime opens, where it is for messages, its short name) of a path or bytes."""
    if isinstance(model, bytes | bytearray):
        return bytes(model), "from the given bytes", "the model"
    path = Path(model)
    if not path.is_file():
        raise ExportError(f"expected an ONNX file at {str(path)!r}, got no such file")
    return str(path), f"at {str(path)!r}", path.name


def build_session(
    model: str | Path | bytes, device: str = "cpu", threads: int | None = None, *, tf32: bool = False
) -> tuple[Any, list[str], str | None]:
    """Create an onnxruntime ``InferenceSession`` on ``device`` and read which providers run it.

    Args:
        model: an ``.onnx`` file, or a serialized model (``ModelProto.SerializeToString()``).
        device: ``auto`` (CUDA if it runs, else CPU), ``cuda`` (or an error) or ``cpu``.
            ``HARDEN_TRT=1`` in the environment puts TensorRT first for ``cuda``/``auto``.
        threads: onnxruntime's intra-op CPU threads (None: its default, one per core).
        tf32: let CUDA round float32 convolutions and matrix products to TensorFloat-32
            (faster on Ampere and later GPUs, logits move by about 1e-3 of their scale).

    Returns:
        ``(session, providers, fallback_reason)``: ``providers`` are the ones
        ``session.get_providers()`` says run, not the ones asked; ``fallback_reason`` says why
        ``device="auto"`` runs on the CPU although onnxruntime lists CUDA (else None).

    Raises:
        ExportError: no such file, not a model onnxruntime can load, an unknown ``device``,
            ``threads`` not an integer >= 1, or ``device="cuda"`` and CUDA does not run (the
            message gives onnxruntime's reason, e.g. missing ``libcuda.so.1`` or cuDNN).

    Example:
        >>> import tempfile, harden
        >>> from harden.testing import TinyCNN
        >>> path = Path(tempfile.mkdtemp()) / "tiny.onnx"
        >>> _ = harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
        >>> session, providers, fallback = build_session(path, "cpu", threads=1)
        >>> providers, fallback, [i.name for i in session.get_inputs()]
        (['CPUExecutionProvider'], None, ['pixels'])
        >>> build_session(path.read_bytes(), "cpu")[1]
        ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise ExportError(f"expected device 'auto', 'cuda' or 'cpu', got {device!r}")
    source, where, name = _source(model)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ExportError(f"expected threads as an integer >= 1 or None, got {threads!r}")
    available = list(ort.get_available_providers())
    asked = providers_for(device, available)
    sess, lines = _create(source, where, asked, threads, tf32)
    running = list(sess.get_providers())
    fallback = None
    if device != "cpu" and CUDA not in running:
        reason = _no_cuda_reason(lines, available)
        if device == "cuda":
            raise ExportError(
                f"expected onnxruntime to run {name} on CUDA (device='cuda'), got only {running} running: "
                f"{reason}. Use device='cpu' or 'auto', or install the CUDA/cuDNN libraries onnxruntime-gpu needs"
            )
        if CUDA in asked:  # listed but not running (when it is not even listed, the CPU is no fallback)
            fallback = reason
            log.info("onnxruntime: running %s on the CPU (%s)", name, reason)
    elif TRT in asked and TRT not in running:
        why = "; ".join(_reasons("\n".join(lines))) or "onnxruntime gave no reason"
        warnings.warn(f"HARDEN_TRT=1 but TensorRT does not run ({why}); running on {running}", RuntimeWarning, 3)
    return sess, running, fallback
