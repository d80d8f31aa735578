"""``harden.certify``: measure what a certificate needs beyond the attack suite, and assemble it.

:func:`measure` runs randomized smoothing and the saliency maps (it lives in :mod:`harden.measure`
with :class:`Measurements`, :func:`saliency_map` and :func:`verify_baseline`, all re-exported
here); :func:`assemble` builds the :class:`~harden.certificate.Certificate` once, from every
measurement (the verification report, smoothing, the ONNX export and the ONNX session's
black-box result when there is one), and computes the verdict last. :func:`certify` is both for
a model in hand (no export).
"""

from __future__ import annotations

import copy
import datetime as _dt
from typing import Any

import torch
from torch import nn

from harden.attacks import ATTACKS
from harden.attacks.suite import preset_specs
from harden.certificate import (
    BaselineSummary,
    Certificate,
    ClassResult,
    SmoothingSummary,
    environment,
    requirement_results,
    requirement_values,
    verdict_rule,
)
from harden.checkpoint import weights_sha256
from harden.checks import onnx_black_box_check
from harden.data import EvalData, load_data
from harden.measure import Measurements, measure, saliency_map, verify_baseline
from harden.models import model_device, prepare_model
from harden.policy import Policy
from harden.policy_io import checked, policy_hash
from harden.schema import HALF_LEVEL
from harden.smoothing import wilson_interval
from harden.verify import RobustnessReport, verify

__all__ = [
    "Certificate",
    "Measurements",
    "assemble",
    "certify",
    "measure",
    "saliency_map",
    "verdict",
    "verify_baseline",
]


def verdict(
    report: RobustnessReport, smoothing: SmoothingSummary | None, checks: dict[str, dict[str, str]]
) -> tuple[str, str]:
    """The verdict and its reason, from every measurement: :func:`harden.certificate.verdict_rule`.

    ``report`` is not consulted: the rule reads only what the certificate records (its checks
    and smoothing), so ``harden inspect`` can re-apply it.

    Args:
        report: the attack suite's report.
        smoothing: randomized-smoothing results, if run.
        checks: every sanity check by id (the suite's and, under ``harden run``, the ONNX one).

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden.verify import verify
        >>> r = verify(TinyCNN(num_classes=3), tiny_policy(verify={"checks": False}), synthetic_tensors(8), progress=False)
        >>> verdict(r, None, {})[0], verdict(r, None, {"onnx_black_box": {"status": "FAIL"}})[0]
        ('EMPIRICAL', 'UNRELIABLE')
    """
    return verdict_rule(checks, smoothing)


def _warnings(policy: Policy) -> list[str]:
    """What a reader of the certificate must see first (an eps no 8-bit image can tell apart, ...)."""
    out = []
    if policy.threat.below_half_level:
        out.append(
            f"threat eps {policy.threat.eps:g} ({policy.threat.norm}) is below half a pixel level (0.5/255 = "
            f"{HALF_LEVEL:.5f}): no 8-bit image differs from the clean one by so little, so the robust accuracy "
            "here says nothing about attacks on real images"
        )
    specs = [*preset_specs(policy.verify.preset), *policy.verify.attacks]
    kinds = [ATTACKS.get(spec.name) for spec in specs]
    if not any(k.white_box and k.bounded and not k.changes_label for k in kinds):
        out.append(
            "the attack suite has no gradient-based attack inside the threat model (fgsm, pgd, apgd_ce, apgd_t, "
            "fab_t): the robust accuracy is only an upper bound from weak attacks"
        )
    if policy.train.select == "best" or policy.train.early_stopping is not None:
        out.append(
            "the training epoch was chosen on the per-epoch probe, a sample of the test split that the verified "
            "examples overlap: the figures may be slightly optimistic"
        )
    return out


def _check_n(report: RobustnessReport, policy: Policy) -> int | None:
    """The examples of the check subset (the eps curve's), None when there is none.

    The report says (``check_n``, 0: none); a report without it (an older one) had the first
    ``verify.check_examples`` of its examples.
    """
    n = getattr(report, "check_n", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n if n >= 1 else None
    return min(policy.verify.check_examples, report.n) if report.eps_curve or report.checks else None


def _eps_intervals(curve: list[tuple[float, float]], n: int | None) -> list[tuple[float, float]]:
    return [] if n is None else [wilson_interval(round(acc * n), n) for _, acc in curve]


def _per_class(report: RobustnessReport) -> list[ClassResult]:
    rows = getattr(report, "per_class", None) or []
    return [ClassResult.model_validate(row) for row in rows]


def _baseline(report: RobustnessReport, policy: Policy, model: nn.Module | None) -> BaselineSummary:
    check_n = _check_n(report, policy)
    return BaselineSummary(
        n=report.n,
        clean_accuracy=report.clean_accuracy,
        robust_accuracy=report.robust_accuracy,
        per_attack=dict(report.per_attack),
        intervals=_intervals(report, other=False),
        eps_curve=list(report.eps_curve),
        eps_intervals=_eps_intervals(report.eps_curve, check_n),
        check_n=check_n,
        weights_sha256=None if model is None else weights_sha256(prepare_model(model, policy.model)),
    )


def _reader_fields(report: RobustnessReport, policy: Policy, measured: Measurements) -> dict[str, Any]:
    """The targets' results, per-class counts, the sample and the check subset (2.3); verify's time split (2.4)."""
    values = requirement_values(report.clean_accuracy, report.robust_accuracy, report.per_attack, measured.smoothing)
    check_n = _check_n(report, policy)
    check_clean = getattr(report, "check_clean_accuracy", None) if check_n is not None else None
    if check_clean is None and check_n is not None and report.eps_curve:
        check_clean = report.eps_curve[0][1]  # an older report: eps 0 is the check subset's clean accuracy
    return {
        "requirements": requirement_results(policy.certify.require, values),
        "per_class": _per_class(report),
        "sample": getattr(report, "sample", None) or None,
        "check_n": check_n,
        "check_clean_accuracy": check_clean,
        "eps_intervals": _eps_intervals(report.eps_curve, check_n),
        "verify_seconds": report.time_split() if report.cascade_seconds > 0 else {},  # 2.4: when verify timed it
        "per_check_seconds": dict(report.per_check_seconds),
    }


def _intervals(report: RobustnessReport, *, other: bool = True) -> dict[str, tuple[float, float]]:
    out = {
        "clean": wilson_interval(round(report.clean_accuracy * report.n), report.n),
        "robust": wilson_interval(round(report.robust_accuracy * report.n), report.n),
    }
    for label, acc in report.per_attack.items():
        out[label] = wilson_interval(round(acc * report.n), report.n)
    for label, acc in report.other_threats.items() if other else ():
        m = report.other_counts.get(label, report.n)
        out[label] = wilson_interval(round(acc * m), m)
    return out


def assemble(
    model: nn.Module,
    policy: Policy,
    report: RobustnessReport,
    measured: Measurements,
    *,
    history: list[dict[str, Any]] | None = None,
    timings: dict[str, float] | None = None,
    export: dict[str, Any] | None = None,
    onnx_black_box: dict[str, Any] | None = None,
    baseline_report: RobustnessReport | None = None,
    baseline: nn.Module | None = None,
) -> Certificate:
    """Build the certificate once, from every measurement; the verdict is computed last.

    The targets of ``policy.certify.require`` are evaluated against the certificate's numbers
    (``requirements``); they do not change the verdict.

    Args:
        model: the certified model (its weights are hashed).
        policy: the policy it was trained and verified under.
        report: the attack suite's report.
        measured: smoothing and saliency (:func:`measure`).
        history: the training history.
        timings: wall seconds by stage (``verify`` defaults to the report's).
        export: the ONNX export's figures (:meth:`harden.export.ExportResult.to_dict`); its
            ``sha256`` becomes ``onnx_sha256``.
        onnx_black_box: the exported session attacked with gradient-free attacks; its per-example
            ``broken_by`` (key ``outcomes``) is compared with the report's: a session that falls
            where the PyTorch model held adds the ``onnx_black_box`` check (see
            :func:`harden.checks.onnx_black_box_check`).
        baseline_report: the undefended baseline verified by the same suite on the same
            examples: its figures go beside the model's (``baseline``).
        baseline: the baseline model itself, only to record the hash of its weights.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden.verify import verify
        >>> model, policy, data = TinyCNN(num_classes=3), tiny_policy(verify={"checks": False}), synthetic_tensors(16)
        >>> report = verify(model, policy, data, progress=False)
        >>> assemble(model, policy, report, Measurements()).verdict
        'EMPIRICAL'
    """
    net = prepare_model(model, policy.model)
    dev = model_device(net)
    times = dict(timings or {})
    times.setdefault("verify", report.seconds)
    times.update(measured.timings)
    checks = dict(report.checks)
    if onnx_black_box is not None:
        torch_broken = report.outcomes.get("broken_by", []) if report.outcomes else []
        check = onnx_black_box_check(torch_broken, onnx_black_box.get("outcomes", []))
        checks[check.id] = check.to_dict()
    decided, reason = verdict(report, measured.smoothing, checks)
    return Certificate(
        verdict=decided,
        verdict_reason=reason,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        policy_name=policy.name,
        policy_sha256=policy_hash(policy),
        weights_sha256=weights_sha256(net),
        onnx_sha256=export.get("sha256") if export else None,
        threat=report.threat,
        n=report.n,
        clean_accuracy=report.clean_accuracy,
        robust_accuracy=report.robust_accuracy,
        per_attack=report.per_attack,
        broken_by=report.broken_by,
        attacks=report.attacks,
        intervals=_intervals(report),
        seed=policy.seed,
        device=str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        versions=environment(),
        timings=times,
        objectives=[o.model_dump(mode="json") for o in policy.objectives],
        epochs=policy.train.epochs,
        training=copy.deepcopy(list(history or [])),
        export=copy.deepcopy(export),  # the certificate shares nothing with the caller
        onnx_black_box=copy.deepcopy(onnx_black_box),
        other_threats=report.other_threats,
        other_counts=report.other_counts,
        eps_curve=report.eps_curve,
        checks=checks,
        warnings=_warnings(policy),
        smoothing=measured.smoothing,
        saliency=measured.saliency,
        baseline=None if baseline_report is None else _baseline(baseline_report, policy, baseline),
        **_reader_fields(report, policy, measured),
    )


def certify(
    model: nn.Module,
    policy: Policy,
    data: EvalData | None = None,
    *,
    report: RobustnessReport | None = None,
    history: list[dict[str, Any]] | None = None,
    timings: dict[str, float] | None = None,
    baseline: nn.Module | None = None,
    progress: bool = True,
    baseline_report: RobustnessReport | None = None,
) -> Certificate:
    """Verify ``model`` (unless ``report`` is given), smooth it if asked, assemble its certificate.

    For a model in hand; :func:`harden.run` also exports it and attacks the ONNX session before
    assembling. Randomized smoothing (``policy.certify``) and the saliency maps run on the first
    test examples, seeded with ``policy.seed`` without touching the global RNG; the model is used
    on its own device and its train/eval modes are restored.

    Args:
        model: the hardened classifier.
        policy: the policy it was trained and is verified under.
        data: evaluation data (default: the policy's test split).
        report: a verification report to reuse instead of attacking again.
        history: the training history to include.
        timings: wall seconds of earlier steps to include.
        baseline: an undefended (plainly trained) model: it is verified by the same suite on the
            same examples (sanity checks off), and its accuracies and eps curve go beside the
            model's; its saliency maps are shown beside the hardened one's.
        progress: show progress bars.
        baseline_report: the baseline's verification report, to reuse instead of attacking it again.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> _ = torch.manual_seed(0)  # the untrained model's weights: its checks' outcomes depend on them
        >>> cert = certify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(16), progress=False)
        >>> cert.verdict, cert.n
        ('EMPIRICAL', 16)
    """
    policy = checked(policy)
    net = prepare_model(model, policy.model)
    bundle = None
    if data is None:  # loaded once: its train split serves the attacks that read it
        bundle = load_data(policy.data)
        data = bundle.test
    if report is None:
        report = verify(net, policy, data, bundle=bundle, history=history, progress=progress)
    if baseline is not None and baseline_report is None:
        baseline_report = verify_baseline(baseline, policy, data, bundle=bundle, progress=progress)
    measured = measure(net, policy, data, baseline=baseline, progress=progress)
    return assemble(
        net,
        policy,
        report,
        measured,
        history=history,
        timings=timings,
        baseline_report=baseline_report,
        baseline=baseline,
    )
