"""ONNX export with normalization inside, a dynamic batch axis, checks and an onnxruntime parity test.

The graph takes ``pixels`` (float32 NCHW in [0, 1]) and returns ``logits``. Export runs on a
CPU copy of the model, so the caller's model is neither moved nor switched to eval mode.

The file is built in a private temp folder beside the target (``.<name>.<random>``, e.g.
``.model.onnx.k3j2x9_a``), fsynced, given mode ``0o666 & ~umask`` like every file harden writes,
and renamed into place (the folder fsynced too); the temp folder is removed whatever happens (a
killed export's is removed when :class:`harden.runfolder.RunFolder` next opens the run folder).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harden.batches import check_pixels, predictions
from harden.checkpoint import file_mode, fsync_dir, sha256_file
from harden.errors import ExportError, InputError
from harden.models import Normalized, prepare_model
from harden.policy import Policy
from harden.policy_io import checked, policy_hash
from harden.runtime import build_session

__all__ = ["ExportResult", "export_onnx", "onnx_metadata"]

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
#: The ``metadata_props`` key naming a converted model's precision (``fp16`` or ``int8``; absent
#: in a plain export, which is ``fp32``): written by :mod:`harden.quantize`.
PRECISION_KEY = "precision"


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
    """The ``metadata_props`` harden writes: versions (harden's, and torch's that exported it), input contract, policy hash, verdict.

    Args:
        model: the exported model (its mean and std are recorded).
        policy: adds its hash and threat model.
        certificate: adds its verdict and accuracies.
        class_names: adds the class names (JSON).

    Returns:
        String keys and values, as ONNX ``metadata_props`` hold them.

    Example:
        >>> from harden.testing import TinyCNN
        >>> meta = onnx_metadata(Normalized(TinyCNN(), (0.5,), (0.25,)), class_names=("cat", "dog"))
        >>> meta["input_range"], meta["mean"], meta["std"], meta["class_names"]
        ('[0, 1]', '[0.5]', '[0.25]', '["cat", "dog"]')
    """
    from harden._version import __version__

    meta = {
        "harden_version": __version__,
        "torch_version": torch.__version__,  # the graph's producer is harden (producer_version: harden's version)
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
        note = getattr(certificate, "verdict_note", None)
        if note:
            meta["certificate_verdict_note"] = str(note)
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


def _parity(net: nn.Module, sess: Any, x: torch.Tensor, atol: float, what: str = "") -> tuple[float, float]:
    """(max abs logit difference, argmax agreement) of onnxruntime against torch on ``x``.

    Raises:
        ExportError: the difference exceeds ``atol`` or an argmax differs on an input whose two
            top torch logits are more than ``2 * atol`` apart (closer ones are near ties that a
            difference within ``atol`` may legitimately swap); ``what`` names the inputs.
    """
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.concatenate(
        [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 32].numpy()})[0] for i in range(0, len(x), 32)]
    )
    ref_t, got_t = torch.from_numpy(ref), torch.from_numpy(got)
    same = predictions(got_t) == predictions(ref_t)  # non-finite logits: no class on either side
    top2 = ref_t.topk(min(2, ref_t.shape[1]), dim=1).values
    # logits within atol can swap only classes whose torch logits are within 2*atol (a near tie)
    decided = (top2[:, 0] - top2[:, -1]) > 2 * atol
    diff, agree = float(np.abs(got - ref).max()), float(same.double().mean())
    if not diff <= atol or not bool(same[decided].all()):
        raise ExportError(
            f"expected onnxruntime logits within {atol} of torch with equal argmax{what}, "
            f"got max abs diff {diff:.3g} and argmax agreement {agree:.2%}"
        )
    return diff, agree


def _parity_inputs(
    parity_inputs: torch.Tensor | None, input_shape: tuple[int, int, int] | None, n: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The parity test's inputs on the CPU (the given ones, else ``n`` seeded uniform images) and ``(C, H, W)``."""
    if parity_inputs is not None:
        parity_inputs = parity_inputs.detach().to("cpu", torch.float32)
        input_shape = input_shape or tuple(parity_inputs.shape[1:])  # type: ignore[assignment]
    if input_shape is None or len(input_shape) != 3:
        raise ExportError(f"expected input_shape as (C, H, W) or parity_inputs, got {input_shape!r}")
    if parity_inputs is None:
        gen = torch.Generator().manual_seed(0)
        parity_inputs = torch.rand(n, *input_shape, generator=gen)
    return parity_inputs, input_shape


def _write_checked(tmp: Path, meta: dict[str, str]) -> Any:
    """Put ``meta`` into the exported graph at ``tmp``, check it, infer shapes, save it back.

    The producer is harden, at harden's version (the exporter sets torch's; torch's version is
    kept in the metadata as ``torch_version``).
    """
    import onnx

    from harden._version import __version__

    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "harden"
    proto.producer_version = __version__
    try:
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"expected a valid ONNX graph, got onnx.checker: {exc}") from None
    onnx.save(proto, str(tmp))
    return proto


def _commit(tmp: Path, path: Path) -> None:
    """Move the finished file at ``tmp`` to ``path`` durably: mode, fsync, rename, fsync of the folder."""
    try:
        os.chmod(tmp, file_mode())
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"expected to write {str(path)!r}, got {exc.strerror or exc}; nothing was written") from None
    fsync_dir(path.parent)


def _adversarial_inputs(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` as CPU float32, after checking it is a non-empty NCHW batch of ``shape`` in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ExportError(
            f"expected adversarial_inputs as a non-empty (N, {', '.join(map(str, shape))}) tensor, got {got}"
        )
    x = x.detach().to("cpu", torch.float32)
    try:
        check_pixels(x, where="adversarial_inputs: ")
    except InputError as exc:  # the export cannot prove parity on them: an export error
        raise ExportError(str(exc)) from exc
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
        >>> import tempfile
        >>> from harden.testing import TinyCNN
        >>> path = Path(tempfile.mkdtemp()) / "tiny.onnx"
        >>> r = export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
        >>> r.path == path, r.parity_max_abs_diff <= 1e-4, r.parity_argmax_agreement, r.providers
        (True, True, 1.0, ['CPUExecutionProvider'])
    """
    t0 = time.perf_counter()
    path = Path(path)
    policy = checked(policy) if isinstance(policy, Policy) else policy
    net = copy.deepcopy(prepare_model(model, getattr(policy, "model", None))).cpu().eval()
    spec = getattr(policy, "export", None)
    opset = opset if opset is not None else getattr(spec, "opset", None)
    atol = getattr(spec, "parity_atol", 1e-4)
    parity_inputs, input_shape = _parity_inputs(parity_inputs, input_shape, getattr(spec, "parity_examples", 64))
    if adversarial_inputs is not None:
        adversarial_inputs = _adversarial_inputs(adversarial_inputs, input_shape)

    path.parent.mkdir(parents=True, exist_ok=True)
    # export into a private directory beside the target: the exporter may write side files
    # (external data), and a failure must leave nothing behind
    tmp_dir = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_dir.name) / path.name
    try:
        exporter = _export(net, parity_inputs[:2].clone(), tmp, opset)
        meta = onnx_metadata(net, policy, certificate, class_names)
        proto = _write_checked(tmp, meta)
        sess, providers, _ = build_session(tmp, "cpu")
        diff, agree = _parity(net, sess, parity_inputs, atol)
        adv_diff = adv_agree = n_adv = None
        if adversarial_inputs is not None:
            n_adv = len(adversarial_inputs)
            adv_diff, adv_agree = _parity(net, sess, adversarial_inputs, atol, f" on the {n_adv} adversarial inputs")
        _commit(tmp, path)
    finally:
        tmp_dir.cleanup()
    return ExportResult(
        path=path,
        sha256=sha256_file(path),
        exporter=exporter,
        opset=int(next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)),
        parity_examples=len(parity_inputs),
        parity_max_abs_diff=diff,
        parity_argmax_agreement=agree,
        providers=providers,
        metadata=meta,
        seconds=time.perf_counter() - t0,
        parity_adversarial_examples=n_adv,
        parity_adversarial_max_abs_diff=adv_diff,
        parity_adversarial_argmax_agreement=adv_agree,
    )
