"""A certificate against itself: the rules ``harden inspect`` re-applies (:mod:`harden.integrity`).

:func:`consistency_problems` lists, per item (``schema``, ``verdict``, ``accuracy``,
``intervals``, ``broken_by``, ``checks``, ``smoothing``, ``export``), what does not fit: the verdict
rule (:func:`harden.certificate.verdict_rule`) re-applied to the recorded checks and smoothing gives
the recorded verdict and reason; every accuracy is a whole count out of its n, robust <= each
per-attack accuracy <= clean along the cascade; each Wilson interval is the one of its count;
``broken_by`` counts add up; check records are well formed; the smoothing summary follows from its
per-example radii; the export's hash is the ONNX hash.
"""

from __future__ import annotations

import math

from harden.certificate import CERTIFICATE_SCHEMA_VERSION, Certificate, verdict_rule
from harden.smoothing import wilson_interval

__all__ = ["consistency_problems"]

_CHECK_STATUSES = frozenset({"PASS", "WARN", "FAIL"})


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


def _accuracy_problems(cert: Certificate) -> list[str]:
    clean, robust, n = cert.clean_accuracy, cert.robust_accuracy, cert.n
    out = [] if robust <= clean else [f"robust accuracy {robust} exceeds clean accuracy {clean}"]
    for label, acc in {"clean": clean, "robust": robust, **cert.per_attack}.items():
        if _count(acc, n) is None:
            out.append(f"{label} accuracy {acc} is not a count out of n={n}")
    prev = clean
    for label, acc in cert.per_attack.items():
        if not robust <= acc <= clean:
            out.append(f"accuracy after {label} ({acc}) is outside [robust {robust}, clean {clean}]")
        if acc > prev:
            out.append(f"accuracy after {label} ({acc}) rises along the cascade")
        prev = acc
    if cert.per_attack and list(cert.per_attack.values())[-1] != robust:
        out.append(f"the cascade ends at {list(cert.per_attack.values())[-1]}, not the robust accuracy {robust}")
    for label, acc in cert.other_threats.items():
        m = cert.other_counts.get(label, n)
        if not 0 <= acc <= 1 or m < 1 or _count(acc, m) is None:
            out.append(f"other threat {label}: accuracy {acc} is not a count out of n={m}")
    return out


def _interval_problems(cert: Certificate) -> list[str]:
    accs = {"clean": (cert.clean_accuracy, cert.n), "robust": (cert.robust_accuracy, cert.n)}
    accs.update({k: (v, cert.n) for k, v in cert.per_attack.items()})
    accs.update({k: (v, cert.other_counts.get(k, cert.n)) for k, v in cert.other_threats.items()})
    out = [f"no interval for {k}" for k in accs if k not in cert.intervals]
    out += [f"interval {k} has no accuracy" for k in cert.intervals if k not in accs]
    for key, (acc, m) in accs.items():
        if key not in cert.intervals:
            continue
        lo, hi = cert.intervals[key]
        k = _count(acc, m)
        if not lo <= acc <= hi or k is None or m < 1:
            out.append(f"{key}: interval [{lo}, {hi}] does not hold accuracy {acc}")
        elif any(abs(a - b) > 1e-9 for a, b in zip((lo, hi), wilson_interval(k, m), strict=True)):
            out.append(f"{key}: interval [{lo}, {hi}] is not the Wilson interval of {k}/{m}")
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
    version = (
        []
        if cert.schema_version == CERTIFICATE_SCHEMA_VERSION
        else [
            f"schema {cert.schema_version!r}; this harden checks {CERTIFICATE_SCHEMA_VERSION!r} certificates "
            "(re-run with this version)"
        ]
    )
    return [
        ("schema", version),
        ("verdict", _verdict_problems(cert)),
        ("accuracy", _accuracy_problems(cert)),
        ("intervals", _interval_problems(cert)),
        ("broken_by", _broken_by_problems(cert)),
        ("checks", _checks_problems(cert)),
        ("smoothing", _smoothing_problems(cert)),
        ("export", _export_problems(cert)),
    ]
