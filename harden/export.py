"""ONNX export with normalization inside, a dynamic batch axis, checks and an onnxruntime parity test.

The graph takes ``pixels`` (float32 NCHW in [0, 1]) and returns ``logits``. Export runs on a
CPU copy of the model, so the caller's model is neither moved nor switched to eval mode.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harden.checkpoint import sha256_file
from harden.errors import ExportError
from harden.models import Normalized, prepare_model

__all__ = ["ExportResult", "export_onnx", "onnx_metadata"]

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced and measured.

    Attributes:
        path: the ``.onnx`` file.
        sha256: its SHA-256.
        exporter: ``dynamo`` or ``torchscript`` (the warned fallback).
        opset: the graph's default-domain opset.
        parity_examples: inputs compared between torch and onnxruntime.
        parity_max_abs_diff: the largest absolute logit difference.
        parity_argmax_agreement: fraction of inputs with the same predicted class.
        providers: the onnxruntime providers that actually ran the parity test.
        metadata: the ``metadata_props`` written into the model.
        seconds: wall time.
        parity_adversarial_examples: adversarial inputs compared (None when none were given).
        parity_adversarial_max_abs_diff: the largest absolute logit difference on them.
        parity_adversarial_argmax_agreement: fraction of them with the same predicted class.
    """

    path: Path
    sha256: str
    exporter: str
    opset: int
    parity_examples: int
    parity_max_abs_diff: float
    parity_argmax_agreement: float
    providers: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    parity_adversarial_examples: int | None = None
    parity_adversarial_max_abs_diff: float | None = None
    parity_adversarial_argmax_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def onnx_metadata(
    model: Normalized, policy: Any = None, certificate: Any = None, class_names: Any = None
) -> dict[str, str]:
    """The ``metadata_props`` harden writes: version, input contract, policy hash, verdict."""
    from harden import __version__
    from harden.policy import policy_hash

    meta = {
        "harden_version": __version__,
        "input_name": INPUT_NAME,
        "input_layout": "NCHW",
        "input_range": "[0, 1]",
        "input_dtype": "float32",
        "normalization": "inside the graph",
        "mean": json.dumps(model.mean_values),
        "std": json.dumps(model.std_values),
    }
    if class_names:
        meta["class_names"] = json.dumps(list(class_names))
    if policy is not None:
        meta["policy_hash"] = policy_hash(policy)
        meta["threat_model"] = json.dumps(policy.threat.model_dump(mode="json"))
    if certificate is not None:
        meta["certificate_verdict"] = str(certificate.verdict)
        meta["robust_accuracy"] = f"{certificate.robust_accuracy:.6f}"
        meta["clean_accuracy"] = f"{certificate.clean_accuracy:.6f}"
    return meta


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> str:
    """Export with the dynamo exporter, falling back (with a warning) to TorchScript."""
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False, **kwargs
            )
        return "dynamo"
    except Exception as exc:
        warnings.warn(
            f"dynamo ONNX export failed ({type(exc).__name__}: {str(exc)[:200]}); falling back to the TorchScript exporter",
            RuntimeWarning,
            stacklevel=3,
        )
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            **kwargs,
        )
    except Exception as exc:
        raise ExportError(f"expected the model to export to ONNX, got {type(exc).__name__}: {exc}") from None
    return "torchscript"


def _parity(net: nn.Module, sess: Any, x: torch.Tensor) -> tuple[float, float]:
    """(max abs logit difference, argmax agreement) of onnxruntime against torch on ``x``."""
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.concatenate(
        [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 32].numpy()})[0] for i in range(0, len(x), 32)]
    )
    return float(np.abs(got - ref).max()), float((got.argmax(1) == ref.argmax(1)).mean())


def _adversarial_inputs(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` as CPU float32, after checking it is a non-empty NCHW batch of ``shape`` in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ExportError(
            f"expected adversarial_inputs as a non-empty (N, {', '.join(map(str, shape))}) tensor, got {got}"
        )
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ExportError(
            f"expected adversarial_inputs as pixels in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )
    return x


def export_onnx(
    model: nn.Module,
    path: str | Path,
    policy: Any = None,
    certificate: Any = None,
    opset: int | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    parity_inputs: torch.Tensor | None = None,
    adversarial_inputs: torch.Tensor | None = None,
    class_names: tuple[str, ...] | None = None,
) -> ExportResult:
    """Export ``model`` to ONNX and prove onnxruntime computes the same logits.

    Args:
        model: the classifier (wrapped with the policy's mean/std unless already ``Normalized``).
        path: the ``.onnx`` file to write (atomically: a failed export leaves no file).
        policy: its hash, threat model and export settings go into the file.
        certificate: its verdict and accuracies go into the metadata.
        opset: ONNX opset (default: the policy's ``export.opset``, else the exporter's).
        input_shape: ``(C, H, W)``; default the shape of ``parity_inputs``.
        parity_inputs: inputs for the parity test (default: seeded uniform noise in [0, 1]).
        adversarial_inputs: adversarial examples (e.g. ``verify(..., keep_adversarial=k)``'s
            ``report.adversarial``) that must pass the same parity test: they sit near decision
            boundaries, where a small numerical difference would flip the predicted class.
        class_names: written into the metadata.

    Returns:
        An :class:`ExportResult` with the parity figures.

    Raises:
        ExportError: export, ``onnx.checker`` or a parity test (clean or adversarial) failed.

    Example:
        >>> from harden.testing import TinyCNN
        >>> r = export_onnx(TinyCNN(num_classes=3), "/tmp/tiny.onnx", input_shape=(1, 8, 8))  # doctest: +SKIP
        >>> r.parity_max_abs_diff <= 1e-4  # doctest: +SKIP
        True
    """
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    path = Path(path)
    net = copy.deepcopy(prepare_model(model, getattr(policy, "model", None))).cpu().eval()
    spec = getattr(policy, "export", None)
    opset = opset if opset is not None else getattr(spec, "opset", None)
    n_parity = getattr(spec, "parity_examples", 64)
    atol = getattr(spec, "parity_atol", 1e-4)
    if parity_inputs is not None:
        parity_inputs = parity_inputs.detach().to("cpu", torch.float32)
        input_shape = input_shape or tuple(parity_inputs.shape[1:])  # type: ignore[assignment]
    if input_shape is None or len(input_shape) != 3:
        raise ExportError(f"expected input_shape as (C, H, W) or parity_inputs, got {input_shape!r}")
    if parity_inputs is None:
        gen = torch.Generator().manual_seed(0)
        parity_inputs = torch.rand(n_parity, *input_shape, generator=gen)
    if adversarial_inputs is not None:
        adversarial_inputs = _adversarial_inputs(adversarial_inputs, input_shape)

    path.parent.mkdir(parents=True, exist_ok=True)
    # export into a private directory beside the target: the exporter may write side files
    # (external data), and a failure must leave nothing behind
    tmp_dir = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_dir.name) / path.name
    try:
        exporter = _export(net, parity_inputs[:2].clone(), tmp, opset)
        proto = onnx.load(str(tmp))
        meta = onnx_metadata(net, policy, certificate, class_names)
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "harden"
        try:
            onnx.checker.check_model(proto, full_check=True)
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        except Exception as exc:
            raise ExportError(f"expected a valid ONNX graph, got onnx.checker: {exc}") from None
        onnx.save(proto, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff, agree = _parity(net, sess, parity_inputs)
        if not diff <= atol or agree < 1.0:
            raise ExportError(
                f"expected onnxruntime logits within {atol} of torch with equal argmax, got max abs diff {diff:.3g} and argmax agreement {agree:.2%}"
            )
        adv_diff: float | None = None
        adv_agree: float | None = None
        if adversarial_inputs is not None:
            adv_diff, adv_agree = _parity(net, sess, adversarial_inputs)
            if not adv_diff <= atol or adv_agree < 1.0:
                raise ExportError(
                    f"expected onnxruntime logits within {atol} of torch with equal argmax on the {len(adversarial_inputs)} "
                    f"adversarial inputs, got max abs diff {adv_diff:.3g} and argmax agreement {adv_agree:.2%}"
                )
        tmp.replace(path)
    finally:
        tmp_dir.cleanup()
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    return ExportResult(
        path=path,
        sha256=sha256_file(path),
        exporter=exporter,
        opset=int(opset_found),
        parity_examples=len(parity_inputs),
        parity_max_abs_diff=diff,
        parity_argmax_agreement=agree,
        providers=list(sess.get_providers()),
        metadata=meta,
        seconds=time.perf_counter() - t0,
        parity_adversarial_examples=None if adversarial_inputs is None else len(adversarial_inputs),
        parity_adversarial_max_abs_diff=adv_diff,
        parity_adversarial_argmax_agreement=adv_agree,
    )
