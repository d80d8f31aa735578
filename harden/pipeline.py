"""``harden.pipeline``: the main job, ``harden.run(policy, out)``: fit, verify, certify, export.

One run, in order, with the data loaded once and handed to every stage:

1. load the policy's data (one :class:`~harden.data.DataBundle`);
2. :func:`harden.fit` on its train split (checkpoints in ``out/checkpoints``, resumable);
3. :func:`harden.verify` on its test split; the ``invariance_examples`` pool and the ``transfer``
   surrogate come from the same train split; ``out/report.json`` (read by ``harden compare``);
4. randomized smoothing and saliency maps (:func:`harden.certify.measure`);
5. :func:`harden.export_onnx` to ``out/model.onnx`` with its parity tests;
6. the exported ONNX session attacked with the gradient-free attacks on the first
   ``export.verify_examples`` examples the suite verified, in its order;
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

import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn
from torch.utils.data import Subset

from harden.batches import resolve_device
from harden.certificate import Certificate
from harden.certify import assemble, verdict
from harden.checkpoint import atomic_write
from harden.data import DataBundle, eval_batches, load_data
from harden.errors import DataError, ModelError
from harden.export import ExportResult, export_onnx
from harden.measure import Measurements, measure, verify_baseline
from harden.model_load import build_model, load_model
from harden.models import model_device, prepare_model
from harden.onnx_session import short_reason
from harden.plan import Plan, make_plan, measure_pass_seconds
from harden.policy import Policy
from harden.policy_io import checked, load_policy, policy_hash
from harden.runfolder import RunFolder
from harden.signing import load_private_key
from harden.smoothing import wilson_interval
from harden.train import FitResult, fit
from harden.verify import RobustnessReport, verify
from harden.verify_onnx import OnnxReport, verify_onnx

__all__ = ["RunResult", "export_summary", "fit_summary", "plan_run", "run"]

log = logging.getLogger(__name__)

#: where a run's human lines go (``print``, a logger, a notebook cell)
Say = Callable[[str], None]


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
    say: Say | None = None,
    baseline: nn.Module | str | Path | None = None,
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
        say: receives the run's human lines as they happen (None: silent): the plan, with an
            estimate of the time, before training (:func:`plan_run`); each stage's summary as
            it finishes (fit, verify, export parity, the ONNX session); the certificate last.
            ``harden run`` passes ``print``.
        baseline: an undefended model to verify with the same suite for the certificate's baseline
            column and curve: an ``nn.Module``, or a weights file of the policy's architecture
            (loaded as :func:`harden.model_load.load_model` does; normalization never switched).

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
    if isinstance(baseline, (str, Path)) and not Path(baseline).is_file():  # before hours of training
        raise ModelError(f"expected the baseline's weights file, got {str(baseline)!r} which does not exist")
    key = load_private_key(sign_key) if isinstance(sign_key, (str, Path)) else sign_key
    with RunFolder.open(out, resume=resume, overwrite=overwrite, policy_hash=policy_hash(policy)) as folder:
        return _run(policy, folder, _Inputs(model, baseline), key, progress, t0, say or _silent)


@dataclass(frozen=True)
class _Inputs:
    """The models a run is handed: the one to harden (None: the policy's) and an undefended baseline."""

    model: nn.Module | None
    baseline: nn.Module | str | Path | None


def _baseline_report(
    policy: Policy, bundle: DataBundle, baseline: nn.Module | str | Path | None, device: torch.device, progress: bool
) -> tuple[nn.Module | None, RobustnessReport | None]:
    """The baseline (a module, or weights of the policy's architecture) verified by the same suite, or Nones."""
    if baseline is None:
        return None, None
    if isinstance(baseline, nn.Module):
        net = prepare_model(baseline, policy.model)
    else:
        net = load_model(None, policy, num_classes=bundle.num_classes, in_chans=bundle.in_chans, weights=baseline)
    net = net.to(device)
    return net, verify_baseline(net, policy, bundle.test, bundle=bundle, progress=progress)


def _run(
    policy: Policy,
    folder: RunFolder,
    inputs: _Inputs,
    sign_key: Ed25519PrivateKey | None,
    progress: bool,
    t0: float,
    say: Say,
) -> RunResult:
    """The stages of :func:`run` in the opened run folder; ``certificate.json`` is written last."""
    out, model = folder.path, inputs.model
    bundle = load_data(policy.data)
    if say is not _silent and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone speaks
        for line in plan_run(policy, bundle, model).lines():
            say(line)
    trained = fit(model, policy, bundle=bundle, run_dir=folder, resume=folder.resume, progress=progress)
    if trained.info.get("rank", 0) != 0:  # under torchrun, rank 0 alone verifies, exports and certifies
        return RunResult(out=out, fit=trained)
    for line in fit_summary(policy, trained):
        say(line)
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
    say(report.summary())
    base_net, base_report = _baseline_report(policy, bundle, inputs.baseline, model_device(net), progress)
    if base_report is not None:
        say(f"undefended baseline: clean {base_report.clean_accuracy:.2%}, robust {base_report.robust_accuracy:.2%}")
    measured = measure(net, policy, bundle.test, progress=False)
    exp = _export(net, policy, bundle, report, measured, out)
    say(export_summary(exp))
    shipped = (
        _verify_shipped(policy, net, exp.path, bundle, report, progress) if policy.export.verify_examples else None
    )
    if shipped is not None:
        say("the exported ONNX session, gradient-free attacks:\n" + shipped.summary())
        if shipped.onnx.get("fallback_reason"):
            say(f"onnxruntime ran on the CPU: {short_reason(str(shipped.onnx['fallback_reason']))}")
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
        baseline_report=base_report,
        baseline=base_net,
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
    say(f"wrote {path}, {exp.path} and {trained.run_dir / 'checkpoints'}/")
    say(
        f"clean accuracy {saved.clean_accuracy:.2%} | robust accuracy {saved.robust_accuracy:.2%} "
        f"({policy.threat.norm}, eps={policy.threat.eps}, n={saved.n}) | verdict {saved.verdict}"
    )
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


def _verify_shipped(
    policy: Policy, net: nn.Module, onnx_path: Path, bundle: DataBundle, report: RobustnessReport, progress: bool
) -> OnnxReport:
    """Attack the exported ONNX session itself (gradient-free attacks) on the suite's first verified examples.

    The examples are the first ``export.verify_examples`` that :func:`harden.verify` attacked
    (``report.outcomes["indices"]``: a class-balanced sample under ``verify.sample: balanced``),
    in its order, so the ``onnx_black_box`` check compares the two example by example.
    """
    n = policy.export.verify_examples
    indices = [int(i) for i in (report.outcomes.get("indices") or [])][:n] or list(range(n))
    subset = Subset(bundle.test, indices)
    xs, ys = zip(*eval_batches(subset, policy.data.eval_batch_size, n), strict=True)
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


def _silent(text: str) -> None:
    """The ``say`` of a run nobody listens to."""


def fit_summary(policy: Policy, result: FitResult) -> list[str]:
    """The lines that sum up a training: epochs trained, time, weights, early stopping, the validation.

    The validation shown is the last epoch's, or with ``train.select: best`` the best probe
    epoch's (the weights the run returns).

    Example:
        >>> from types import SimpleNamespace
        >>> from harden.testing import tiny_policy
        >>> r = SimpleNamespace(resumed_from=None, seconds=2.0, weights="w.safetensors", best_epoch=1,
        ...                     stopped_early=False, history=[{"epoch": 1, "val_clean_acc": 0.9, "val_pgd_acc": 0.5}])
        >>> fit_summary(tiny_policy(), r)  # doctest: +NORMALIZE_WHITESPACE
        ['trained 1 epoch(s) in 2.0 s -> w.safetensors', 'best probe epoch 1',
         'validation: clean 90.00%, PGD-3 probe 50.00%']
    """
    lines = []
    spec, history = policy.train, result.history
    if result.resumed_from is not None:
        lines.append(f"resumed from the checkpoint of epoch {result.resumed_from}")
    trained = len(history) - (result.resumed_from or 0)  # early stopping may end before train.epochs
    if trained > 0:
        lines.append(f"trained {trained} epoch(s) in {result.seconds:.1f} s -> {result.weights}")
    else:
        lines.append(f"trained no epoch: the checkpoint already holds all {len(history)} -> {result.weights}")
    if result.stopped_early:
        lines.append(
            f"stopped early after epoch {len(history)}: the probe's robust accuracy did not improve for "
            f"{spec.early_stopping} epochs"
        )
    if result.best_epoch is not None:
        lines.append(f"best probe epoch {result.best_epoch}")
    shown, which = (history[-1] if history else {}), ""
    if spec.select == "best" and result.best_epoch is not None:
        best = [r for r in history if r.get("epoch") == result.best_epoch]
        if best:
            shown, which = best[-1], f" (best epoch {result.best_epoch})"
    if "val_clean_acc" in shown:
        probe = f", PGD-{spec.probe_steps} probe {shown['val_pgd_acc']:.2%}" if "val_pgd_acc" in shown else ""
        lines.append(f"validation{which}: clean {shown['val_clean_acc']:.2%}{probe}")
    return lines


def export_summary(res: ExportResult) -> str:
    """One line: the ONNX file, its exporter and opset, and the onnxruntime parity it passed."""
    adv = ""
    if res.parity_adversarial_examples:
        adv = f", {res.parity_adversarial_examples} adversarial inputs max |Δlogit| {res.parity_adversarial_max_abs_diff:.2e}"
    return (
        f"exported {res.path} ({res.exporter}, opset {res.opset}); onnxruntime parity: max |Δlogit| "
        f"{res.parity_max_abs_diff:.2e} on {res.parity_examples} inputs, argmax agreement "
        f"{res.parity_argmax_agreement:.0%}{adv}"
    )


def plan_run(policy: Policy, bundle: DataBundle, model: nn.Module | None = None) -> Plan:
    """The :class:`~harden.plan.Plan` of a run of ``policy`` on ``bundle``, timed on one training batch.

    The pass is measured on a throwaway copy of ``model`` (or a model built from the policy,
    inside ``torch.random.fork_rng``: the run's own model and RNG are untouched) on the policy's
    device; when it cannot be measured (a model that will fail the run's own checks), the plan
    comes without an estimate.

    Example:
        >>> from harden.testing import synthetic_bundle, tiny_policy
        >>> plan = plan_run(tiny_policy(), synthetic_bundle())
        >>> plan.batches_per_epoch, plan.seconds_per_pass is not None
        (6, True)
    """
    policy = checked(policy)
    seconds = None
    try:
        with torch.random.fork_rng():
            device = resolve_device(policy.device)
            if model is None:
                net = build_model(policy.model, bundle.num_classes, bundle.in_chans)
            else:
                net = copy.deepcopy(prepare_model(model, policy.model))
            batch = next(iter(eval_batches(bundle.train, policy.data.batch_size, policy.data.batch_size)))
            seconds = measure_pass_seconds(net.to(device), batch)
            del net
    except Exception as exc:  # the estimate is a courtesy: fit reports a broken model in its own words
        log.debug("no time estimate: %s: %s", type(exc).__name__, exc)
    return make_plan(
        policy,
        n_train=len(bundle.train),  # type: ignore[arg-type]
        n_test=len(bundle.test),  # type: ignore[arg-type]
        image_shape=bundle.image_shape,
        num_classes=bundle.num_classes,
        seconds_per_pass=seconds,
    )
