"""``harden.report_sections``: what a certificate says, as titled sections of paragraphs and tables.

:mod:`harden.report` renders these sections twice (Markdown and HTML), so both say the same
things. The labels people read instead of JSON keys and the number formats live in
:mod:`harden.report_format` ; here is one builder per section, in reading order:
threat model, accuracy, per class, other threats, accuracy vs eps, randomized smoothing, sanity
checks, training, saliency, integrity, reproducibility. A :class:`Plot` block marks where the
HTML page places a plot of :func:`harden.plots.certificate_plots`; Markdown leaves it out.

The certificate is named only in annotations, so this module sits below
:mod:`harden.certificate`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from harden.report_format import (
    CHECK_LABELS,
    CLEAN_LABEL,
    DASH,
    ROBUST_LABEL,
    Block,
    Plot,
    Section,
    Table,  # noqa: F401  (unused here: importable from this module as it was)
    attack_label,
    ci,
    fmt,
    key_label,
    pct,
    status_label,
    threat_text,
)

if TYPE_CHECKING:
    from harden.certificate import Certificate, SmoothingSummary

__all__ = ["sections"]  # the labels, formats and block types: harden.report_format


def sections(cert: Certificate) -> list[Section]:
    """Everything the certificate says, in reading order (shared by both renderings).

    Args:
        cert: the certificate.

    Returns:
        The sections, each with its title and blocks; the optional ones (per class, accuracy vs
        eps, randomized smoothing, saliency) only when the certificate has their data.

    Example:
        >>> from harden.certificate import Certificate
        >>> cert = Certificate(verdict="EMPIRICAL", created="2025-01-01T00:00:00+00:00", policy_name="demo",
        ...     policy_sha256="ab" * 32, weights_sha256="cd" * 32, threat={"norm": "linf", "eps": 0.1}, n=200,
        ...     clean_accuracy=0.98, robust_accuracy=0.965, per_attack={"pgd": 0.965}, attacks=[{"name": "pgd"}],
        ...     seed=0, device="cpu", versions={})
        >>> [s.title for s in sections(cert)]
        ['Threat model', 'Accuracy', 'Other threats', 'Sanity checks', 'Training', 'Integrity', 'Reproducibility']
    """
    attacks = [
        [str(i + 1), str(a.get("name", "?")), attack_label(str(a.get("name", "?"))), fmt(a.get("params") or {})]
        for i, a in enumerate(cert.attacks)
    ]
    threat: list[Block] = [
        f"Perturbations within {threat_text(cert)}; pixels in [0, 1]. Attacks run as a worst-case cascade: each "
        "attacks only the examples still classified right, so an example counts as robust only if every attack fails."
    ]
    head = ["#", "attack", "what it is", "parameters"]
    out = [Section("Threat model", threat + ([(head, attacks)] if attacks else []))]
    out.append(_accuracy_section(cert))
    if cert.per_class:
        out.append(_per_class_section(cert))
    other = [
        [attack_label(label), pct(acc), str(cert.other_counts.get(label, cert.n)), ci(cert, label)]
        for label, acc in cert.other_threats.items()
    ]
    text = "Attacks outside the l_p threat model, each run on all examples; not part of the worst case."
    table: Block = (["threat", "accuracy", "n", "95% Wilson interval"], other) if other else "None were run."
    out.append(Section("Other threats", [text, table]))
    if cert.eps_curve:
        out.append(_eps_section(cert))
    if cert.smoothing is not None:
        out.append(_smoothing_section(cert.smoothing))
    out.append(_checks_section(cert))
    out.append(_training_section(cert))
    if cert.saliency:
        names = list(dict.fromkeys(k for ex in cert.saliency for k in ex.maps))
        text = (
            f"Input-gradient saliency maps (|d CE / dx|, max over channels, scaled to [0, 1]) of "
            f"{len(cert.saliency)} test images; maps: {', '.join(names)}."
        )
        rows = [[str(i + 1), str(ex.label), str(ex.prediction)] for i, ex in enumerate(cert.saliency)]
        out.append(Section("Saliency", [text, Plot("saliency"), (["example", "label", "prediction"], rows)]))
    out.append(_integrity_section(cert))
    facts = [["policy", cert.policy_name], ["created", cert.created], ["schema version", cert.schema_version]]
    facts += [["device", cert.device], ["seed", str(cert.seed)]]
    facts += [[f"time: {k}", f"{v:.2f} s"] for k, v in cert.timings.items()]
    versions = [[k, v] for k, v in cert.versions.items()]
    blocks: list[Block] = [(["fact", "value"], facts), *_verify_time(cert), (["package", "version"], versions)]
    out.append(Section("Reproducibility", blocks))
    return out


def _wilson_half_width(n: int) -> float:
    """The widest 95% Wilson half-width of a rate out of ``n`` (at 50%), in points.

    Example:
        >>> round(_wilson_half_width(200), 1), round(_wilson_half_width(100), 1)
        (6.9, 9.6)
    """
    z2 = 1.959963984540054**2
    return 100 * math.sqrt(z2 * (0.25 / n + z2 / (4 * n * n))) / (1 + z2 / n)


def _checks_section(cert: Certificate) -> Section:
    costs = cert.per_check_seconds
    rows = [
        [
            CHECK_LABELS.get(cid, cid),
            c.get("id", cid),
            status_label(c.get("status", "?")),
            c.get("detail", ""),
            c.get("remedy", ""),
            f"{costs[cid]:.2f} s" if cid in costs else DASH,
        ]
        for cid, c in cert.checks.items()
    ]
    if not rows:
        return Section("Sanity checks", ["No sanity checks were run."])
    blocks: list[Block] = [(["check", "id", "status", "detail", "remedy", "time"], rows)]
    blocks.append("SKIP (N/A): the check had nothing to test here; it is not a pass.")
    if cert.check_n:
        blocks.append(
            f"The checks ran on the check subset: {cert.check_n} of the verified examples, drawn as they were "
            f"(a seeded class-balanced sample by default). A rate measured on it has a 95% Wilson interval at most "
            f"{_wilson_half_width(cert.check_n):.1f} points either side (at 50%; narrower near 0% and 100%, where the "
            "checks' thresholds of 1% of the examples, chance + 5 points and 5 points lie)."
        )
    if costs:
        blocks.append(
            "Time: each check's wall time, the attacks it ran included; the PGD runs it shares with the eps sweep "
            "(which the checks continue) count in the sweep's time."
        )
    return Section("Sanity checks", blocks)


_PARTS = {
    "attacks": "attacks of the threat model (the cascade)",
    "other_attacks": "attacks outside the l_p threat model, and the cascade's bookkeeping",
    "setup": "set-up (data, preparing the attacks, e.g. training a transfer surrogate)",
    "checks": "sanity checks",
    "eps_sweep": "eps sweep",
    "rest": "the rest",
}


def _verify_time(cert: Certificate) -> list[Block]:
    """Where the verification's time went (schema 2.4): a table with each part's seconds and share."""
    parts = cert.verify_seconds
    total = sum(parts.values())
    if not parts or total <= 0:
        return []
    rows = [[_PARTS.get(k, k), f"{v:.2f} s", f"{v / total:.1%}"] for k, v in parts.items()]
    return [f"Verification time, {total:.2f} s in all:", (["part of verification", "time", "share"], rows)]


def _accuracy_section(cert: Certificate) -> Section:
    b = cert.baseline
    rows = [
        [CLEAN_LABEL, pct(cert.clean_accuracy), str(cert.n), ci(cert, "clean"), str(cert.broken_by.get("clean", ""))]
    ]
    base = [pct(b.clean_accuracy)] if b else []
    for label, acc in cert.per_attack.items():
        fooled = str(cert.broken_by.get(label, ""))
        rows.append([f"After {attack_label(label)}", pct(acc), str(cert.n), ci(cert, label), fooled])
        base.append(pct(b.per_attack.get(label)) if b else "")
    rows.append([ROBUST_LABEL, pct(cert.robust_accuracy), str(cert.n), ci(cert, "robust"), ""])
    head = ["measure", "accuracy", "examples", "95% Wilson interval", "examples first fooled here"]
    if b is not None:
        head.append("undefended baseline")
        base.append(pct(b.robust_accuracy))
        rows = [[*row, v] for row, v in zip(rows, base, strict=True)]
    sample = {"balanced": "a seeded class-balanced sample", "first": "the first examples"}.get(cert.sample or "")
    text = (
        f"Examples verified: {cert.n}" + (f" ({sample} of the test split)" if sample else "") + ". "
        "Each row after the first is the accuracy left after that attack of the cascade; "
        '"examples first fooled here" counts the examples that attack was the first to break '
        "(on the clean row: the examples wrong without attack)."
    )
    blocks: list[Block] = [text, (head, rows)]
    subsets = _clean_subsets(cert)
    if len(subsets) > 1:
        blocks += [
            "The clean accuracy is measured on more than one subset of the test split; the figures differ only "
            "because the subsets differ:",
            (["clean accuracy of", "accuracy", "examples"], subsets),
        ]
    return Section("Accuracy", blocks)


def _clean_subsets(cert: Certificate) -> list[list[str]]:
    out = [["the verified examples (the headline figure)", pct(cert.clean_accuracy), str(cert.n)]]
    m = str(cert.check_n) if cert.check_n is not None else DASH
    if cert.check_clean_accuracy is not None:
        what = "the check subset (where the sanity checks and the eps curve ran)"
        out.append([what, pct(cert.check_clean_accuracy), m])
    if cert.eps_curve and float(cert.eps_curve[0][0]) == 0.0:
        out.append(["eps 0 of the eps curve (the check subset, unattacked)", pct(cert.eps_curve[0][1]), m])
    return out


def _per_class_section(cert: Certificate) -> Section:
    rows = [
        [
            f"{r.label} ({r.name})" if r.name else str(r.label),
            str(r.n),
            pct(r.clean / r.n) if r.n else DASH,
            pct(r.robust / r.n) if r.n else DASH,
        ]
        for r in cert.per_class
    ]
    text = "Clean and robust accuracy of each class on the verified examples."
    return Section("Accuracy per class", [text, (["class", "examples", "clean accuracy", "robust accuracy"], rows)])


def _eps_section(cert: Certificate) -> Section:
    m = f" on the {cert.check_n}-example check subset" if cert.check_n else ""
    text = (
        f"Accuracy under attack as the {threat_text(cert)} budget varies{m} (eps 0: its clean accuracy; the other "
        "radii than the threat's are PGD runs continuing a neighbouring radius); the shaded band is the 95% Wilson "
        "interval, the dashed line the threat's eps."
    )
    head = ["eps", "accuracy", "95% Wilson interval"]
    rows = []
    for i, (e, a) in enumerate(cert.eps_curve):
        lo_hi = cert.eps_intervals[i] if i < len(cert.eps_intervals) else None
        rows.append([fmt(float(e)), pct(a), DASH if lo_hi is None else f"[{pct(lo_hi[0])}, {pct(lo_hi[1])}]"])
    b = cert.baseline
    if b is not None and b.eps_curve:
        head.append("undefended baseline")
        theirs = {float(e): a for e, a in b.eps_curve}
        rows = [[*row, pct(theirs.get(float(e)))] for row, (e, _) in zip(rows, cert.eps_curve, strict=True)]
    return Section("Accuracy vs eps", [text, Plot("eps"), (head, rows)])


def _integrity_section(cert: Certificate) -> Section:
    integrity = [
        ["weights SHA-256", cert.weights_sha256],
        ["ONNX SHA-256", cert.onnx_sha256 or DASH],
        ["policy SHA-256", cert.policy_sha256],
    ]
    if cert.baseline is not None and cert.baseline.weights_sha256:
        integrity.append(["baseline weights SHA-256", cert.baseline.weights_sha256])
    blocks: list[Block] = [(["artefact", "hash"], integrity)]
    if cert.export:
        blocks += ["ONNX export parity (onnxruntime vs torch):"]
        blocks += [(["export", "value"], [[key_label(k), fmt(v)] for k, v in cert.export.items()])]
    if cert.onnx_black_box:
        ob = cert.onnx_black_box
        n = str(ob.get("n", ""))
        rows = [[f"After {attack_label(k)}", pct(v), n] for k, v in (ob.get("per_attack") or {}).items()]
        rows = [[CLEAN_LABEL, pct(ob.get("clean_accuracy")), n], *rows]
        rows.append([ROBUST_LABEL, pct(ob.get("robust_accuracy")), n])
        blocks += [
            "The exported ONNX model attacked itself (onnxruntime, providers "
            + ", ".join(map(str, ob.get("providers") or []))
            + ") with the gradient-free attacks:",
            (["measure", "accuracy", "examples"], rows),
        ]
    return Section("Integrity", blocks)


def _smoothing_section(s: SmoothingSummary) -> Section:
    settings = [
        ["sigma", fmt(s.sigma)],
        ["n0 / n", f"{s.n0} / {s.n}"],
        ["alpha", fmt(s.alpha)],
        ["examples", str(s.examples)],
        ["abstentions", str(s.abstentions)],
        ["l2 radius", fmt(s.radius)],
        ["certified accuracy at the radius", pct(s.certified_accuracy)],
        ["required for CERTIFIED", pct(s.min_certified_accuracy)],
        ["noisy samples per second", f"{s.samples_per_second:.0f}"],
    ]
    text = (
        "The guarantee is about the smoothed classifier (the model under Gaussian noise, majority vote), "
        "not the base model: each of its predictions is constant within its certified l2 radius with "
        f"probability at least {1 - s.alpha:g} (Cohen et al. 2019, Clopper-Pearson bounds)."
    )
    blocks: list[Block] = [text, (["setting", "value"], settings)]
    if s.curve:
        blocks += [Plot("smoothing"), (["l2 radius", "certified accuracy"], [[fmt(r), pct(a)] for r, a in s.curve])]
    return Section("Randomized smoothing", blocks)


def _training_section(cert: Certificate) -> Section:
    objectives = [
        [str(o.get("name", "?")), fmt(o.get("weight", 1.0)), fmt(o.get("params") or {})] for o in cert.objectives
    ]
    blocks: list[Block] = [f"Epochs planned: {fmt(cert.epochs)}; epochs recorded: {len(cert.training)}."]
    if objectives:
        blocks.append((["objective", "weight", "parameters"], objectives))
    if cert.training:
        last = cert.training[-1]
        metrics = [[key_label(k), pct(v) if k.endswith("_acc") else fmt(v)] for k, v in last.items()]
        blocks += [Plot("training"), f"Final epoch ({fmt(last.get('epoch', len(cert.training)))}):"]
        blocks.append((["metric", "value"], metrics))
    return Section("Training", blocks)
