"""``harden.pipeline``: the main job, ``harden.run(policy, out)``: fit, verify, certify, export.

One run, in order, with the data loaded once and handed to every stage:

1. load the policy's data (one :class:`~harden.data.DataBundle`);
2. :func:`harden.fit` on its train split (checkpoints in ``out/checkpoints``, resumable);
3. :func:`harden.verify` on its test split; the ``invariance_examples`` pool and the ``transfer``
   surrogate come from the same train split; ``out/report.json`` (read by ``harden compare``);
4. randomized smoothing and saliency maps (:func:`harden.certify.measure`);
5. :func:`harden.export_onnx` to ``out/model.onnx`` with its parity tests;
6. the exported ONNX session attacked with the gradient-free attacks (``export.verify_examples``);
7. the certificate assembled once from every measurement, the verdict computed last
   (:func:`harden.certify.assemble`), and written as ``certificate.md`` / ``.html`` and then
   ``certificate.json``, the last file a run writes.

The run folder is opened once (:class:`harden.runfolder.RunFolder`) and held for the whole run:
one writer at a time, and a fresh run into a used folder is refused unless ``overwrite=True``
(``resume=True`` continues its run). The final artifacts are written in this order:
``model.safetensors`` (fit), ``report.json``, ``model.onnx``, then ``certificate.json`` last, as
the run's commit marker: **a folder whose ``certificate.json`` is missing is an unfinished run**
(its ``model.onnx``, if any, is not vouched for by anything; a resume deletes it and writes it
again).

The CLI's ``harden run`` and the examples call :func:`run` and do nothing else.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from harden.certificate import Certificate
from harden.certify import Measurements, assemble, measure, verdict
from harden.checkpoint import atomic_write
from harden.data import DataBundle, eval_batches, load_data
from harden.errors import DataError
from harden.export import ExportResult, export_onnx
from harden.models import model_device
from harden.policy import Policy
from harden.policy_io import checked, load_policy, policy_hash
from harden.runfolder import RunFolder
from harden.signing import load_private_key
from harden.smoothing import wilson_interval
from harden.train import FitResult, fit
from harden.verify import RobustnessReport, verify
from harden.verify_onnx import OnnxReport, verify_onnx

__all__ = ["RunResult", "run"]


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` produced. Under ``torchrun``, ranks other than 0 only train (the rest is None).

    Attributes:
        out: the run directory.
        fit: the training result (model, history, weights, timings).
        report: the attack suite's report on the PyTorch model (``out/report.json``).
        export: the ONNX export and its parity figures (``out/model.onnx``).
        onnx_report: the ONNX session under gradient-free attacks (None: ``export.verify_examples`` is 0).
        certificate: the certificate (``out/certificate.json``), assembled once.
        certificate_path: where it was written.
    """

    out: Path
    fit: FitResult
    report: RobustnessReport | None = None
    export: ExportResult | None = None
    onnx_report: OnnxReport | None = None
    certificate: Certificate | None = None
    certificate_path: Path | None = None

    @property
    def model(self) -> nn.Module:
        """The hardened model (eval mode)."""
        return self.fit.model


@dataclass(frozen=True)
class _Measured:
    """The verdict and accuracies known before export, for the ONNX file's metadata."""

    verdict: str
    robust_accuracy: float
    clean_accuracy: float
    verdict_note: str = (
        "measured before this file's own session was attacked; certificate.json (which holds this file's "
        "SHA-256) has the final verdict"
    )


def run(
    policy: Policy | str | Path,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    resume: bool = False,
    overwrite: bool = False,
    sign_key: Ed25519PrivateKey | str | Path | None = None,
    allow_code: bool | Sequence[str] = False,
    progress: bool = True,
) -> RunResult:
    """Fit, verify, certify and export a model under ``policy``; write everything into ``out``.

    Args:
        policy: a :class:`~harden.policy.Policy` or the path of a policy YAML file.
        out: the run directory (created if missing).
        model: the model to harden (None: built from ``policy.model``).
        resume: continue the run in ``out`` from its newest intact checkpoint (its final
            artifacts are deleted and written again).
        overwrite: replace a previous run in ``out`` (harden's artifacts only; a fresh run into
            a used folder is refused without it).
        sign_key: an Ed25519 private key, or the path of its PEM file, to sign the certificate
            with (None: unsigned); see :meth:`harden.certificate.Certificate.save`. A key file
            is read before anything else runs, so a bad one fails at once.
        allow_code: when ``policy`` is a file: the code it may name (``True``: any; module or
            package names: those and their submodules; ``False``: none but harden's tiny test
            models). See :func:`harden.policy_io.load_policy`.
        progress: show progress bars.

    Returns:
        A :class:`RunResult`.

    Raises:
        RunFolderError: ``out`` is held by another process, or used and neither ``resume`` nor
            ``overwrite`` is given.
        HardenError: a bad policy, data, model or checkpoint, or a failed export (one line each).

    Example:
        >>> import tempfile
        >>> from harden.testing import tiny_policy
        >>> policy = tiny_policy(verify={"checks": False}, export={"verify_examples": 16})
        >>> result = run(policy, tempfile.mkdtemp(), progress=False)
        >>> result.certificate.verdict, result.certificate.onnx_sha256 == result.export.sha256
        ('EMPIRICAL', True)
    """
    t0 = time.perf_counter()
    policy = checked(load_policy(policy, allow_code=allow_code) if isinstance(policy, (str, Path)) else policy)
    key = load_private_key(sign_key) if isinstance(sign_key, (str, Path)) else sign_key
    with RunFolder.open(out, resume=resume, overwrite=overwrite, policy_hash=policy_hash(policy)) as folder:
        return _run(policy, folder, model, key, progress, t0)


def _run(
    policy: Policy,
    folder: RunFolder,
    model: nn.Module | None,
    sign_key: Ed25519PrivateKey | None,
    progress: bool,
    t0: float,
) -> RunResult:
    """The stages of :func:`run` in the opened run folder; ``certificate.json`` is written last."""
    out = folder.path
    bundle = load_data(policy.data)
    trained = fit(model, policy, bundle=bundle, run_dir=folder, resume=folder.resume, progress=progress)
    if trained.info.get("rank", 0) != 0:  # under torchrun, rank 0 alone verifies, exports and certifies
        return RunResult(out=out, fit=trained)
    net = trained.model
    report = verify(
        net,
        policy,
        bundle.test,
        bundle=bundle,
        history=trained.history,
        progress=progress,
        keep_adversarial=policy.export.parity_examples,
    )
    atomic_write(out / "report.json", json.dumps(report.to_dict(), indent=2).encode())  # harden compare reads it
    measured = measure(net, policy, bundle.test, progress=False)
    exp = _export(net, policy, bundle, report, measured, out)
    shipped = _verify_shipped(policy, net, exp.path, bundle, progress) if policy.export.verify_examples else None
    timings = {"fit": trained.seconds, "verify": report.seconds, "export": exp.seconds}
    timings["total"] = time.perf_counter() - t0
    cert = assemble(
        net,
        policy,
        report,
        measured,
        history=trained.history,
        timings=timings,
        export=exp.to_dict(),
        onnx_black_box=None if shipped is None else _black_box_summary(shipped),
    )
    if cert.verdict != exp.metadata.get("certificate_verdict", cert.verdict):
        warnings.warn(
            f"{exp.path.name}'s metadata says {exp.metadata['certificate_verdict']} (measured before export); "
            f"the certificate says {cert.verdict}: {cert.verdict_reason}",
            UserWarning,
            stacklevel=2,
        )
    path = cert.save(
        out, signing_key=sign_key
    )  # certificate.md / .html, then certificate.json: the last write of the run
    saved = Certificate.load(path)  # as written (with what save adds: the rendered files' hashes)
    return RunResult(
        out=out, fit=trained, report=report, export=exp, onnx_report=shipped, certificate=saved, certificate_path=path
    )


def _export(
    net: nn.Module, policy: Policy, bundle: DataBundle, report: RobustnessReport, measured: Measurements, out: Path
) -> ExportResult:
    """Export with parity tests on the first test images and the suite's adversarial inputs.

    The ONNX metadata records the verdict and accuracies measured so far: the file cannot record
    the attacks on its own session (its hash is in the certificate), so ``certificate.json``
    is the final word.
    """
    known, _ = verdict(report, measured.smoothing, report.checks)
    n = policy.export.parity_examples
    parity = next((x for x, _ in eval_batches(bundle.test, n, n)), None)
    if parity is None:
        raise DataError("expected test examples for the export's parity test, got none")
    return export_onnx(
        net,
        out / "model.onnx",
        policy=policy,
        certificate=_Measured(known, report.robust_accuracy, report.clean_accuracy),
        parity_inputs=parity,
        adversarial_inputs=report.adversarial,
        class_names=bundle.class_names,
    )


def _verify_shipped(policy: Policy, net: nn.Module, onnx_path: Path, bundle: DataBundle, progress: bool) -> OnnxReport:
    """Attack the exported ONNX session itself (gradient-free attacks) on the first test examples."""
    n = policy.export.verify_examples
    xs, ys = zip(*eval_batches(bundle.test, policy.data.eval_batch_size, n), strict=True)
    data = (torch.cat(xs)[:n], torch.cat(ys)[:n])
    device = "cuda" if model_device(net).type == "cuda" else "cpu"
    return verify_onnx(onnx_path, policy, data, bundle=bundle, torch_model=net, device=device, progress=progress)


def _black_box_summary(rep: OnnxReport) -> dict[str, Any]:
    """The certificate's ``onnx_black_box`` entry: accuracies with Wilson intervals, providers, outcomes."""
    right = {k: round(v * rep.n) for k, v in rep.per_attack.items()}
    return {
        "n": rep.n,
        "clean_accuracy": rep.clean_accuracy,
        "robust_accuracy": rep.robust_accuracy,
        "per_attack": rep.per_attack,
        "intervals": {
            "clean": wilson_interval(round(rep.clean_accuracy * rep.n), rep.n),
            "robust": wilson_interval(round(rep.robust_accuracy * rep.n), rep.n),
            **{k: wilson_interval(v, rep.n) for k, v in right.items()},
        },
        "providers": rep.onnx.get("providers", []),
        "seconds": rep.seconds,
        "outcomes": list(rep.outcomes.get("broken_by", [])),
    }
