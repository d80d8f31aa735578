"""A certificate against itself: the rules ``harden inspect`` re-applies (:mod:`harden.integrity`).

:func:`consistency_problems` lists, per item (``schema``, ``verdict``, ``accuracy``,
``intervals``, ``broken_by``, ``checks``, ``smoothing``, ``export``), what does not fit: the verdict
rule (:func:`harden.certificate.verdict_rule`) re-applied to the recorded checks and smoothing gives
the recorded verdict and reason; every accuracy is a whole count out of its n, robust <= each
per-attack accuracy <= clean along the cascade; each Wilson interval is the one of its count;
``broken_by`` counts add up; check records are well formed; the smoothing summary follows from its
per-example radii; the export's hash is the ONNX hash. Since 2.3 also ``requirements`` (each
target re-parsed and re-evaluated against the certificate's own numbers), ``baseline`` (the
undefended model's figures fit together as the model's do), the per-class counts and the check
subset (in ``accuracy``) and the eps-curve intervals (in ``intervals``). Since 2.4 (in ``checks``)
each sanity check's cost belongs to a recorded check, and together they fit in the time the checks
took (``verify_seconds``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from harden.certificate import (
    CERTIFICATE_SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    Certificate,
    fields_after,
    requirement_results,
    verdict_rule,
)
from harden.errors import PolicyError
from harden.smoothing import wilson_interval

__all__ = ["consistency_problems"]

#: SKIP: the check tested nothing (N/A); it never counts as a pass
_CHECK_STATUSES = frozenset({"PASS", "WARN", "FAIL", "SKIP"})


def _verdict_problems(cert: Certificate) -> list[str]:
    decided, reason = verdict_rule(cert.checks, cert.smoothing)
    out = []
    if (decided, reason) != (cert.verdict, cert.verdict_reason):
        out.append(
            f"the verdict rule gives {decided} ({reason}), the certificate says {cert.verdict} ({cert.verdict_reason})"
        )
    if cert.verdict == "CERTIFIED" and cert.smoothing is None:
        out.append("CERTIFIED without randomized smoothing")
    return out


def _count(acc: float, n: int) -> int | None:
    """``acc * n`` when it is a whole number of examples (to float rounding), else None."""
    k = acc * n
    return round(k) if math.isfinite(k) and abs(k - round(k)) <= 1e-6 else None


def _cascade_problems(clean: float, robust: float, n: int, per_attack: Mapping[str, float]) -> list[str]:
    out = [] if robust <= clean else [f"robust accuracy {robust} exceeds clean accuracy {clean}"]
    for label, acc in {"clean": clean, "robust": robust, **per_attack}.items():
        if _count(acc, n) is None:
            out.append(f"{label} accuracy {acc} is not a count out of n={n}")
    prev = clean
    for label, acc in per_attack.items():
        if not robust <= acc <= clean:
            out.append(f"accuracy after {label} ({acc}) is outside [robust {robust}, clean {clean}]")
        if acc > prev:
            out.append(f"accuracy after {label} ({acc}) rises along the cascade")
        prev = acc
    if per_attack and list(per_attack.values())[-1] != robust:
        out.append(f"the cascade ends at {list(per_attack.values())[-1]}, not the robust accuracy {robust}")
    return out


def _accuracy_problems(cert: Certificate) -> list[str]:
    n = cert.n
    out = _cascade_problems(cert.clean_accuracy, cert.robust_accuracy, n, cert.per_attack)
    for label, acc in cert.other_threats.items():
        m = cert.other_counts.get(label, n)
        if not 0 <= acc <= 1 or m < 1 or _count(acc, m) is None:
            out.append(f"other threat {label}: accuracy {acc} is not a count out of n={m}")
    return out + _per_class_problems(cert) + _check_subset_problems(cert)


def _per_class_problems(cert: Certificate) -> list[str]:
    rows = cert.per_class
    if not rows:
        return []
    bad = [r for r in rows if not r.robust <= r.clean <= r.n]
    out = [f"class {r.label}: expected robust <= clean <= n, got {r.robust}, {r.clean}, {r.n}" for r in bad]
    if len({r.label for r in rows}) != len(rows):
        out.append("per_class repeats a label")
    totals = (sum(r.n for r in rows), sum(r.clean for r in rows), sum(r.robust for r in rows))
    want = (cert.n, _count(cert.clean_accuracy, cert.n), _count(cert.robust_accuracy, cert.n))
    if totals != want:
        out.append(f"per_class sums to n/clean/robust {totals}, the certificate's counts are {want}")
    return out


def _check_subset_problems(cert: Certificate) -> list[str]:
    m, acc = cert.check_n, cert.check_clean_accuracy
    out = []
    if m is not None and m > cert.n:
        out.append(f"check subset of {m} examples is larger than the {cert.n} verified")
    if acc is not None and (m is None or _count(acc, m) is None):
        out.append(f"check-subset clean accuracy {acc} is not a count out of check_n={m}")
    return out


def _wilson_problems(
    intervals: Mapping[str, tuple[float, float]], accs: Mapping[str, tuple[float, int]], prefix: str = ""
) -> list[str]:
    out = [f"{prefix}no interval for {k}" for k in accs if k not in intervals]
    out += [f"{prefix}interval {k} has no accuracy" for k in intervals if k not in accs]
    for key, (acc, m) in accs.items():
        if key not in intervals:
            continue
        lo, hi = intervals[key]
        k = _count(acc, m)
        if not lo <= acc <= hi or k is None or m < 1:
            out.append(f"{prefix}{key}: interval [{lo}, {hi}] does not hold accuracy {acc}")
        elif any(abs(a - b) > 1e-9 for a, b in zip((lo, hi), wilson_interval(k, m), strict=True)):
            out.append(f"{prefix}{key}: interval [{lo}, {hi}] is not the Wilson interval of {k}/{m}")
    return out


def _curve_accs(curve: list[tuple[float, float]], m: int | None) -> dict[str, tuple[float, int]]:
    return {f"eps={e:g}": (a, m or 0) for e, a in curve}


def _interval_problems(cert: Certificate) -> list[str]:
    accs = {"clean": (cert.clean_accuracy, cert.n), "robust": (cert.robust_accuracy, cert.n)}
    accs.update({k: (v, cert.n) for k, v in cert.per_attack.items()})
    accs.update({k: (v, cert.other_counts.get(k, cert.n)) for k, v in cert.other_threats.items()})
    out = _wilson_problems(cert.intervals, accs)
    if cert.eps_intervals:  # 2.3: one per point of the curve, out of the check subset
        if len(cert.eps_intervals) != len(cert.eps_curve):
            return [*out, f"{len(cert.eps_intervals)} eps intervals for {len(cert.eps_curve)} eps-curve points"]
        keyed = dict(zip(_curve_accs(cert.eps_curve, cert.check_n), cert.eps_intervals, strict=True))
        out += _wilson_problems(keyed, _curve_accs(cert.eps_curve, cert.check_n), "eps curve ")
    return out


def _broken_by_problems(cert: Certificate) -> list[str]:
    out = [f"{k}: negative count {v}" for k, v in cert.broken_by.items() if v < 0]
    out += [f"{k}: not an attack of the cascade" for k in cert.broken_by if k != "clean" and k not in cert.per_attack]
    clean_k, robust_k = _count(cert.clean_accuracy, cert.n), _count(cert.robust_accuracy, cert.n)
    if clean_k is None or robust_k is None:
        return out  # reported by the accuracy check
    fooled = sum(v for k, v in cert.broken_by.items() if k != "clean")
    if fooled > clean_k - robust_k:
        out.append(f"attacks fooled {fooled} examples, more than the {clean_k - robust_k} clean minus robust")
    if cert.broken_by.get("clean", 0) > cert.n - clean_k:
        out.append(
            f"{cert.broken_by['clean']} examples wrong when clean, more than the {cert.n - clean_k} the accuracy allows"
        )
    return out


def _checks_problems(cert: Certificate) -> list[str]:
    out = []
    for cid, c in cert.checks.items():
        if c.get("status") not in _CHECK_STATUSES:
            out.append(f"check {cid}: status {c.get('status')!r} is not one of {sorted(_CHECK_STATUSES)}")
        if c.get("id", cid) != cid:
            out.append(f"check {cid} is filed under another id ({c.get('id')!r})")
    if (cert.onnx_black_box is None) != ("onnx_black_box" not in cert.checks):
        out.append("onnx_black_box results and the onnx_black_box check come together, got one without the other")
    out += [f"check {cid} has a cost but no record" for cid in cert.per_check_seconds if cid not in cert.checks]
    spent, total = sum(cert.per_check_seconds.values()), cert.verify_seconds.get("checks")
    if total is not None and spent > total + 1e-6:  # each check's time lies within the checks' time
        out.append(f"the checks cost {spent:.6g} s one by one, more than the {total:.6g} s they took together")
    return out


def _smoothing_problems(cert: Certificate) -> list[str]:
    s = cert.smoothing
    if s is None:
        return []
    out = []
    if not len(s.labels) == len(s.predictions) == len(s.radii) == s.examples:
        out.append(
            f"{s.examples} examples but {len(s.labels)} labels, {len(s.predictions)} predictions, {len(s.radii)} radii"
        )
    elif s.abstentions != sum(p == -1 for p in s.predictions):
        out.append(f"{s.abstentions} abstentions recorded, {sum(p == -1 for p in s.predictions)} in the predictions")
    elif s.radius is not None and s.examples:
        # radii are stored rounded to 6 decimals: a radius within 1e-6 of the threshold counts either way
        right = [r for y, p, r in zip(s.labels, s.predictions, s.radii, strict=True) if p == y and p != -1]
        lo, hi = (
            sum(r >= s.radius + 1e-6 for r in right) / s.examples,
            sum(r >= s.radius - 1e-6 for r in right) / s.examples,
        )
        if s.certified_accuracy is None or not lo <= s.certified_accuracy <= hi:
            out.append(
                f"certified accuracy {s.certified_accuracy} does not follow from the per-example radii ({lo:g}..{hi:g})"
            )
    return out


def _export_problems(cert: Certificate) -> list[str]:
    if cert.export is None:
        return [] if cert.onnx_sha256 is None else ["onnx_sha256 is recorded without an export record"]
    out = []
    if cert.export.get("sha256") != cert.onnx_sha256:
        out.append(f"export.sha256 {cert.export.get('sha256')!r} differs from onnx_sha256 {cert.onnx_sha256!r}")
    meta = cert.export.get("metadata")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        out.append("export.metadata is not a mapping of strings")
    return out


def _requirement_problems(cert: Certificate) -> list[str]:
    out = []
    for rec in cert.requirements:
        try:
            (again,) = requirement_results([rec.text], cert.measured_values())
        except PolicyError as exc:
            out.append(f"requirement {rec.text!r}: {exc}")
            continue
        same = (again.metric, again.op, again.passed) == (rec.metric, rec.op, rec.passed) and again.actual == rec.actual
        if not same or abs(again.value - rec.value) > 1e-9:
            out.append(
                f"requirement {rec.text!r}: the numbers give {'PASS' if again.passed else 'FAIL'} "
                f"(measured {again.actual}), the certificate says {'PASS' if rec.passed else 'FAIL'} "
                f"(measured {rec.actual}, {rec.metric} {rec.op} {rec.value})"
            )
    return out


def _baseline_problems(cert: Certificate) -> list[str]:
    b = cert.baseline
    if b is None:
        return []
    out = [f"baseline {p}" for p in _cascade_problems(b.clean_accuracy, b.robust_accuracy, b.n, b.per_attack)]
    if b.n != cert.n:
        out.append(f"baseline verified on {b.n} examples, the model on {cert.n}")
    accs = {"clean": (b.clean_accuracy, b.n), "robust": (b.robust_accuracy, b.n)}
    accs.update({k: (v, b.n) for k, v in b.per_attack.items()})
    out += _wilson_problems(b.intervals, accs, "baseline ")
    if b.eps_intervals and len(b.eps_intervals) != len(b.eps_curve):
        out.append(f"baseline: {len(b.eps_intervals)} eps intervals for {len(b.eps_curve)} eps-curve points")
    elif b.eps_intervals:
        keyed = dict(zip(_curve_accs(b.eps_curve, b.check_n), b.eps_intervals, strict=True))
        out += _wilson_problems(keyed, _curve_accs(b.eps_curve, b.check_n), "baseline eps curve ")
    return out


def _schema_problems(cert: Certificate) -> list[str]:
    if cert.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        return [
            f"schema {cert.schema_version!r}; this harden checks {' and '.join(map(repr, SUPPORTED_SCHEMA_VERSIONS))} "
            "certificates (re-run with this version)"
        ]
    fields = Certificate.model_fields
    later = fields_after(cert.schema_version)
    late = [f for f in later if getattr(cert, f) != fields[f].get_default(call_default_factory=True)]
    if late:
        newest = CERTIFICATE_SCHEMA_VERSION
        return [f"schema {cert.schema_version!r} has no {', '.join(late)} (fields of later versions, up to {newest})"]
    return []


def consistency_problems(cert: Certificate) -> list[tuple[str, list[str]]]:
    """Each consistency item with what does not fit (an empty list: consistent).

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> from harden.certify import certify
        >>> cert = certify(TinyCNN(num_classes=3), tiny_policy(verify={"checks": False}), synthetic_tensors(8), progress=False)
        >>> [item for item, problems in consistency_problems(cert) if problems]
        []
        >>> dict(consistency_problems(cert.model_copy(update={"verdict": "CERTIFIED"})))["verdict"][0][:27]
        'the verdict rule gives EMPI'
    """
    return [
        ("schema", _schema_problems(cert)),
        ("verdict", _verdict_problems(cert)),
        ("accuracy", _accuracy_problems(cert)),
        ("intervals", _interval_problems(cert)),
        ("broken_by", _broken_by_problems(cert)),
        ("checks", _checks_problems(cert)),
        ("smoothing", _smoothing_problems(cert)),
        ("export", _export_problems(cert)),
        ("requirements", _requirement_problems(cert)),
        ("baseline", _baseline_problems(cert)),
    ]
