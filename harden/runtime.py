"""ONNX inference you can trust: know which execution provider runs, feed only valid pixels.

:func:`load_onnx` opens an ONNX classifier exported by :func:`harden.export_onnx` (any graph
taking float32 NCHW pixels in [0, 1] and returning logits works) in an onnxruntime session built
by :func:`build_session` (:mod:`harden.onnx_session`: the one place harden creates sessions), and
reports the providers that *actually* run it: onnxruntime-gpu lists ``CUDAExecutionProvider``
even on a machine without a GPU or without the CUDA/cuDNN libraries, and then silently runs on
the CPU.

- ``device="cpu"``: ``CPUExecutionProvider`` only.
- ``device="cuda"``: ``CUDAExecutionProvider`` (device 0) with the CPU as onnxruntime's fallback
  for unsupported nodes; :class:`harden.errors.ExportError` with onnxruntime's own reason when
  CUDA does not run.
- ``device="auto"``: CUDA when onnxruntime lists it and it runs, else the CPU; the reason for a
  fallback is kept in :attr:`OnnxClassifier.fallback_reason`.

TensorRT is opt-in: ``HARDEN_TRT=1`` in the environment (see :mod:`harden.onnx_session`).

Inputs pass the one pixel contract, :func:`harden.data.check_pixels` (float32 NCHW in [0, 1]),
plus the graph's own channels and size. :class:`OnnxModule` wraps a session as a gradient-free
``nn.Module`` for harden's black-box attacks (``square``, ``noise``, ``transfer``,
``invariance``); see :func:`harden.verify_onnx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from harden.batches import check_pixels as check_pixel_contract
from harden.batches import predictions
from harden.errors import DataError, ExportError, ModelError
from harden.onnx_session import CPU, CUDA, TRT, build_session, providers_for

__all__ = ["CPU", "CUDA", "TRT", "OnnxClassifier", "OnnxModule", "build_session", "load_onnx", "providers_for"]

Pixels = TypeVar("Pixels", np.ndarray, torch.Tensor)


# ---------------------------------------------------------------- the classifier
def load_onnx(
    path: str | Path, device: str = "auto", *, threads: int | None = None, tf32: bool = False
) -> OnnxClassifier:
    """Open an ONNX classifier in onnxruntime on ``device`` and report what actually runs.

    Args:
        path: the ``.onnx`` file (float32 NCHW pixels in [0, 1] in, logits out).
        device: ``auto`` (CUDA if it runs, else CPU), ``cuda`` (or an error) or ``cpu``.
            ``HARDEN_TRT=1`` in the environment puts TensorRT first for ``cuda``/``auto``.
        threads: onnxruntime's intra-op CPU threads (None: its default, one per core).
        tf32: let CUDA round float32 convolutions and matrix products to TensorFloat-32
            (faster on Ampere and later GPUs, logits move by about 1e-3 of their scale). Off by
            default, so that a CUDA session keeps the float32 parity the export measured.

    Returns:
        An :class:`OnnxClassifier`; its ``providers`` are the ones running, not the ones asked.

    Raises:
        ExportError: no such file, not a model onnxruntime can load, not one float input and
            one output, an unknown ``device``, ``threads`` not an integer >= 1, or ``device="cuda"`` and CUDA does not run (the
            message gives onnxruntime's reason, e.g. missing ``libcuda.so.1`` or cuDNN).

    Example:
        >>> import tempfile, torch, harden
        >>> from harden.testing import TinyCNN
        >>> path = tempfile.mkdtemp() + "/tiny.onnx"
        >>> _ = harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
        >>> clf = load_onnx(path, device="cpu")
        >>> clf.providers, clf.device, clf.input_shape
        (['CPUExecutionProvider'], 'cpu', (1, 8, 8))
        >>> clf.predict_logits(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5, 3])
    """
    session, _running, fallback = build_session(path, device, threads, tf32=tf32)
    return OnnxClassifier(Path(path), session, fallback_reason=fallback)


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxClassifier:
    """An onnxruntime session of an image classifier, with validated inputs and batching.

    Build it with :func:`load_onnx`. Inputs are numpy arrays or torch tensors of float32 NCHW
    pixels in [0, 1]; outputs have the input's type. On CUDA, inputs and outputs go through
    IO binding (torch CUDA tensors are read and written in place on the GPU); on the CPU the
    session runs plainly. Nothing moves between devices behind your back: a CUDA tensor given
    to a session running on the CPU is refused.

    Attributes:
        path: the ``.onnx`` file.
        session: the ``onnxruntime.InferenceSession``.
        providers: the execution providers actually running, in priority order.
        device: ``cuda`` when CUDA (or TensorRT) runs, else ``cpu``.
        metadata: the model's ``metadata_props`` (harden writes version, input contract,
            policy hash, threat model, verdict).
        input_name: the graph's input (``pixels`` for harden exports).
        output_name: the graph's first output (``logits`` for harden exports).
        input_shape: ``(C, H, W)`` when the graph fixes them, else None.
        num_classes: the number of logits when the graph fixes it, else None.
        fallback_reason: why ``device="auto"`` runs on the CPU although CUDA is listed (None
            when it was not asked for or CUDA runs).

    Example:
        >>> import tempfile, numpy as np, harden
        >>> from harden.testing import TinyCNN
        >>> path = tempfile.mkdtemp() + "/tiny.onnx"
        >>> _ = harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
        >>> clf = load_onnx(path, "cpu")
        >>> x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
        >>> clf.predict(x, batch_size=4).shape, clf.predict(x).dtype
        ((7,), dtype('int64'))
        >>> clf.predict(x * 2)
        Traceback (most recent call last):
        ...
        harden.errors.InputError: expected pixels in [0, 1], got values in [...]; divide by 255 ...
    """

    def __init__(self, path: Path, session: Any, *, fallback_reason: str | None = None) -> None:
        self.path = Path(path)
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.device = "cuda" if (CUDA in self.providers or TRT in self.providers) else "cpu"
        self.fallback_reason = fallback_reason
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ExportError(
                f"expected a graph with one input (pixels) and logits out, got {len(inputs)} input(s) and {len(outputs)} output(s)"
            )
        inp = inputs[0]
        if inp.type != "tensor(float)" or len(inp.shape) != 4:
            raise ExportError(f"expected a float32 NCHW input, got {inp.name!r} of {inp.type} with shape {inp.shape}")
        self.input_name: str = inp.name
        self.output_name: str = outputs[0].name
        self._dims = tuple(_static(d) for d in inp.shape[1:])
        self.input_shape: tuple[int, int, int] | None = (
            None if None in self._dims else tuple(self._dims)  # type: ignore[assignment]
        )
        out_shape = outputs[0].shape
        self.num_classes: int | None = _static(out_shape[-1]) if len(out_shape) == 2 else None
        self._cuda_id = 0
        if self.device == "cuda":
            opts = session.get_provider_options().get(CUDA, {})
            self._cuda_id = int(opts.get("device_id", 0))

    def __repr__(self) -> str:
        return f"OnnxClassifier(path={str(self.path)!r}, providers={self.providers})"

    @property
    def torch_device(self) -> torch.device:
        """Where torch tensors should live to feed this session without copies.

        ``cuda:<id>`` when the session runs on CUDA and torch sees CUDA, else ``cpu``.
        """
        if self.device == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", self._cuda_id)
        return torch.device("cpu")

    # ------------------------------------------------------------ checks
    def check_pixels(self, x: np.ndarray | torch.Tensor) -> None:
        """Raise :class:`harden.errors.DataError` unless ``x`` is a batch this model takes.

        That is: a torch tensor on the CPU or, for a session running on CUDA, on its GPU (or a
        numpy array); then the pixel contract of :func:`harden.data.check_pixels` (float32,
        non-empty NCHW, finite, in [0, 1]: :class:`harden.errors.InputError`, a ``DataError``);
        then the graph's channels and size.

        Example:
            >>> import tempfile, torch, harden
            >>> from harden.testing import TinyCNN
            >>> path = tempfile.mkdtemp() + "/tiny.onnx"
            >>> _ = harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
            >>> load_onnx(path, "cpu").check_pixels(torch.rand(2, 1, 8, 8))
            >>> load_onnx(path, "cpu").check_pixels(torch.rand(2, 1, 4, 4))
            Traceback (most recent call last):
            ...
            harden.errors.DataError: expected images of shape (C, H, W) = 1x8x8 as in tiny.onnx, got (1, 4, 4)
        """
        if isinstance(x, torch.Tensor):
            self._check_device(x)
        check_pixel_contract(x, float32=True)
        want = tuple(d if d is not None else got for d, got in zip(self._dims, x.shape[1:], strict=True))
        if tuple(x.shape[1:]) != want:
            shape = "x".join("?" if d is None else str(d) for d in self._dims)
            raise DataError(
                f"expected images of shape (C, H, W) = {shape} as in {self.path.name}, got {tuple(x.shape[1:])}"
            )

    def _check_device(self, x: torch.Tensor) -> None:
        """Refuse a tensor where this session does not run (harden never moves tensors)."""
        on_gpu = x.device.type == "cuda"
        index = (x.device.index if x.device.index is not None else torch.cuda.current_device()) if on_gpu else -1
        if on_gpu and (self.device != "cuda" or index != self._cuda_id):
            where = f"cuda:{self._cuda_id}" if self.device == "cuda" else "the CPU"
            raise DataError(
                f"expected a tensor on {where} (where this session runs: {self.providers}), got one on {x.device}; "
                "move it yourself (harden never moves tensors between devices)"
            )
        if x.device.type not in ("cpu", "cuda"):
            raise DataError(f"expected a CPU or CUDA tensor, got one on {x.device}")

    # ------------------------------------------------------------ inference
    def predict_logits(self, x: Pixels, batch_size: int = 256) -> Pixels:
        """Logits of ``x``, computed ``batch_size`` images at a time.

        Args:
            x: float32 NCHW pixels in [0, 1]: a numpy array, or a torch tensor on the CPU (or on
                the session's GPU when it runs on CUDA).
            batch_size: images per onnxruntime call.

        Returns:
            ``(N, num_classes)`` float32 logits of the type of ``x`` (a torch tensor on ``x``'s
            device, without gradient).

        Raises:
            DataError: ``x`` is not such a batch (dtype, shape, channels, NaN, range, device),
                or ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"expected batch_size as an integer >= 1, got {batch_size!r}")
        self.check_pixels(x)
        n = x.shape[0]
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.device.type == "cuda":
                return torch.cat([self._run_cuda_tensor(x[i : i + batch_size]) for i in range(0, n, batch_size)])
            host = np.ascontiguousarray(x.numpy())
            return torch.from_numpy(self._run_host(host, batch_size))
        return self._run_host(np.ascontiguousarray(x), batch_size)

    def predict(self, x: Pixels, batch_size: int = 256) -> Pixels:
        """Predicted class per image (int64), of the type of ``x``; see :meth:`predict_logits`.

        A row of logits with a NaN or infinity has no class: -1 (see :func:`harden.batches.predictions`).
        """
        logits = self.predict_logits(x, batch_size)
        if isinstance(logits, torch.Tensor):
            return predictions(logits)
        return predictions(torch.from_numpy(logits)).numpy()

    def _run_host(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Host arrays: plain ``session.run`` on the CPU, IO binding on CUDA."""
        outs = []
        for i in range(0, x.shape[0], batch_size):
            chunk = x[i : i + batch_size]
            if self.device == "cuda":
                binding = self.session.io_binding()
                binding.bind_cpu_input(self.input_name, chunk)
                binding.bind_output(self.output_name, "cpu")
                self.session.run_with_iobinding(binding)
                outs.append(binding.copy_outputs_to_cpu()[0])
            else:
                outs.append(self.session.run([self.output_name], {self.input_name: chunk})[0])
        return np.concatenate(outs).astype(np.float32, copy=False)

    def _run_cuda_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A CUDA tensor, bound in place: onnxruntime reads ``x`` and writes the logits on the GPU."""
        x = x.contiguous()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self._cuda_id, np.float32, tuple(x.shape), x.data_ptr())
        torch.cuda.synchronize(x.device)  # x is written (torch's stream) before onnxruntime's stream reads it
        if self.num_classes is None:  # the graph does not fix the class count: let onnxruntime allocate
            binding.bind_output(self.output_name, "cpu")
            self.session.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(x.device)
        out = torch.empty((x.shape[0], self.num_classes), dtype=torch.float32, device=x.device)
        binding.bind_output(self.output_name, "cuda", self._cuda_id, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out


class OnnxModule(nn.Module):
    """An :class:`OnnxClassifier` as a gradient-free ``nn.Module``, for harden's black-box attacks.

    ``forward`` returns the session's logits as a tensor on ``x``'s device, without a gradient
    graph. Gradient attacks (``fgsm``, ``pgd``, ``apgd_*``, ``fab_t``, ``iwd``) cannot run on
    it: an input that requires a gradient is refused with :class:`harden.errors.ModelError`.
    It has no parameters, so harden treats it as a CPU module; feed it tensors on
    ``classifier.torch_device``.

    Args:
        classifier: the session (see :func:`load_onnx`).
        batch_size: images per onnxruntime call.

    Example:
        >>> import tempfile, torch, harden
        >>> from harden.attacks import ATTACKS
        >>> from harden.testing import TinyCNN
        >>> path = tempfile.mkdtemp() + "/tiny.onnx"
        >>> _ = harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
        >>> net = OnnxModule(load_onnx(path, "cpu"))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> ATTACKS.get("noise")(harden.ThreatModel(eps=0.1), {"samples": 2})(net, x, y).shape
        torch.Size([4, 1, 8, 8])
        >>> ATTACKS.get("pgd")(harden.ThreatModel(eps=0.1), {"steps": 2})(net, x, y)
        Traceback (most recent call last):
        ...
        harden.errors.ModelError: expected an input without requires_grad ...
    """

    def __init__(self, classifier: OnnxClassifier, batch_size: int = 256) -> None:
        super().__init__()
        if not isinstance(classifier, OnnxClassifier):
            raise ModelError(f"expected an OnnxClassifier (see harden.load_onnx), got {type(classifier).__name__}")
        self.classifier = classifier
        self.batch_size = batch_size

    def extra_repr(self) -> str:
        """Path and running providers."""
        return f"path={str(self.classifier.path)!r}, providers={self.classifier.providers}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` from the session (no gradient graph)."""
        if not isinstance(x, torch.Tensor):
            raise DataError(f"expected a torch tensor of pixels, got {type(x).__name__}")
        if x.requires_grad:
            raise ModelError(
                "expected an input without requires_grad (an ONNX session has no gradients), got x.requires_grad=True; "
                "gradient attacks (fgsm, pgd, apgd_ce, apgd_t, fab_t, iwd) cannot run on an ONNX session: use the "
                "gradient-free attacks (square, noise, transfer, invariance) or attack the PyTorch model"
            )
        return self.classifier.predict_logits(x, self.batch_size)
