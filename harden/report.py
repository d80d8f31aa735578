"""``harden.report``: a :class:`~harden.certificate.Certificate` as Markdown and as one HTML page.

Both renderings are built from the same sections (tables and paragraphs), so they say the same
things; the HTML page adds plots (matplotlib, Agg canvas, PNG inlined as ``data:`` URIs) and the
saliency maps, drawn by :mod:`harden.plots`. The HTML page is self-contained: inline CSS, no
scripts, fonts or external URLs, so it reads offline and can be archived next to
``certificate.json``.

The certificate's ``warnings`` (notes a reader must see) come first in both, right under the
title. Stable element ids in the HTML page: ``warnings`` (when there are any), ``verdict``,
``clean-accuracy``, ``robust-accuracy`` and, when randomized smoothing ran,
``certified-accuracy``; each section has ``id="section-<slug>"``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harden.plots import certificate_plots

if TYPE_CHECKING:
    from harden.certificate import Certificate, SmoothingSummary

__all__ = ["to_html", "to_markdown"]

_DASH = "—"
_COLOURS = {
    "CERTIFIED": ("#1a7f37", "#dafbe1"),
    "EMPIRICAL": ("#9a6700", "#fff8c5"),
    "UNRELIABLE": ("#cf222e", "#ffebe9"),
    "PASS": ("#1a7f37", "#dafbe1"),
    "WARN": ("#9a6700", "#fff8c5"),
    "FAIL": ("#cf222e", "#ffebe9"),
}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
background:#f6f8fa;margin:0;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px;background:#fff}
h1{font-size:1.7em;margin:0 0 .3em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}
td.nowrap{white-space:nowrap;word-break:normal}
.badge{display:inline-block;padding:2px 10px;border-radius:6px;font-weight:700}
.verdict{font-size:1.25em}.reason{margin:.4em 0 1em}
.cards{display:flex;gap:16px;flex-wrap:wrap;margin:1em 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 16px;min-width:180px}
.card .value{font-size:1.8em;font-weight:700}.card .sub{color:#59636e;font-size:.85em}
img.plot{max-width:100%;height:auto;display:block;margin:.6em 0}
.warnings{border:2px solid #cf222e;background:#ffebe9;color:#82071e;border-radius:8px;padding:8px 16px;margin:.6em 0 1em}
.warnings ul{margin:.3em 0;padding-left:1.2em}
""" + "".join(f".s-{k}{{color:{fg};background:{bg}}}" for k, (fg, bg) in _COLOURS.items())

_Table = tuple[list[str], list[list[str]]]


@dataclass(frozen=True)
class _Plot:
    """Where a plot goes (HTML only): the key of :func:`harden.plots.certificate_plots`."""

    key: str


_Block = str | _Table | _Plot


@dataclass
class _Section:
    """One titled part of the certificate: paragraphs (str) and tables, in order (both formats)."""

    title: str
    blocks: list[_Block] = field(default_factory=list)


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{x:.2%}"


def _fmt(v: Any) -> str:
    if v is None:
        return _DASH
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if x is not None) or _DASH
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _ci(cert: Certificate, key: str) -> str:
    lo_hi = cert.intervals.get(key)
    return _DASH if lo_hi is None else f"[{_pct(lo_hi[0])}, {_pct(lo_hi[1])}]"


def _threat(cert: Certificate) -> str:
    return ", ".join(f"{k} = {_fmt(v)}" for k, v in cert.threat.items() if v is not None) or _DASH


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _sections(cert: Certificate) -> list[_Section]:
    """Everything the certificate says, in reading order (shared by both renderings)."""
    attacks = [[str(i + 1), str(a.get("name", "?")), _fmt(a.get("params") or {})] for i, a in enumerate(cert.attacks)]
    threat: list[_Block] = [
        f"Perturbations within {_threat(cert)}; pixels in [0, 1]. Attacks run as a worst-case cascade."
    ]
    out = [_Section("Threat model", threat + ([(["#", "attack", "parameters"], attacks)] if attacks else []))]
    rows = [["clean", _pct(cert.clean_accuracy), str(cert.n), _ci(cert, "clean"), str(cert.broken_by.get("clean", ""))]]
    for label, acc in cert.per_attack.items():
        rows.append([f"after {label}", _pct(acc), str(cert.n), _ci(cert, label), str(cert.broken_by.get(label, ""))])
    rows.append(["worst case (robust)", _pct(cert.robust_accuracy), str(cert.n), _ci(cert, "robust"), ""])
    head = ["measure", "accuracy", "n", "95% Wilson interval", "examples first fooled"]
    out.append(_Section("Accuracy", [(head, rows)]))
    other = [
        [label, _pct(acc), str(cert.other_counts.get(label, cert.n)), _ci(cert, label)]
        for label, acc in cert.other_threats.items()
    ]
    text = "Attacks outside the l_p threat model, each run on all examples; not part of the worst case."
    table: _Block = (["threat", "accuracy", "n", "95% Wilson interval"], other) if other else "None were run."
    out.append(_Section("Other threats", [text, table]))
    if cert.eps_curve:
        text = f"PGD accuracy as the {_threat(cert)} budget varies (eps 0: clean accuracy)."
        curve = [[_fmt(float(e)), _pct(a)] for e, a in cert.eps_curve]
        out.append(_Section("Accuracy vs eps", [text, _Plot("eps"), (["eps", "accuracy"], curve)]))
    if cert.smoothing is not None:
        out.append(_smoothing_section(cert.smoothing))
    checks = [
        [c.get("id", cid), c.get("status", "?"), c.get("detail", ""), c.get("remedy", "")]
        for cid, c in cert.checks.items()
    ]
    table = (["id", "status", "detail", "remedy"], checks) if checks else "No sanity checks were run."
    out.append(_Section("Sanity checks", [table]))
    out.append(_training_section(cert))
    if cert.saliency:
        names = list(dict.fromkeys(k for ex in cert.saliency for k in ex.maps))
        text = (
            f"Input-gradient saliency maps (|d CE / dx|, max over channels, scaled to [0, 1]) of "
            f"{len(cert.saliency)} test images; maps: {', '.join(names)}."
        )
        rows = [[str(i + 1), str(ex.label), str(ex.prediction)] for i, ex in enumerate(cert.saliency)]
        out.append(_Section("Saliency", [text, _Plot("saliency"), (["example", "label", "prediction"], rows)]))
    integrity = [
        ["weights SHA-256", cert.weights_sha256],
        ["ONNX SHA-256", cert.onnx_sha256 or _DASH],
        ["policy SHA-256", cert.policy_sha256],
    ]
    blocks: list[_Block] = [(["artefact", "hash"], integrity)]
    if cert.export:
        blocks += ["ONNX export parity (onnxruntime vs torch):"]
        blocks += [(["export", "value"], [[k, _fmt(v)] for k, v in cert.export.items()])]
    if cert.onnx_black_box:
        ob = cert.onnx_black_box
        rows = [[f"after {k}", _pct(v), str(ob.get("n", ""))] for k, v in ob.get("per_attack", {}).items()]
        rows = [["clean", _pct(ob.get("clean_accuracy")), str(ob.get("n", ""))], *rows]
        rows.append(["worst case (robust)", _pct(ob.get("robust_accuracy")), str(ob.get("n", ""))])
        blocks += [
            "The exported ONNX model attacked itself (onnxruntime, providers "
            + ", ".join(ob.get("providers", []))
            + ") with the gradient-free attacks:",
            (["measure", "accuracy", "n"], rows),
        ]
    out.append(_Section("Integrity", blocks))
    facts = [["policy", cert.policy_name], ["created", cert.created], ["schema version", cert.schema_version]]
    facts += [["device", cert.device], ["seed", str(cert.seed)]]
    facts += [[f"time: {k}", f"{v:.2f} s"] for k, v in cert.timings.items()]
    versions = [[k, v] for k, v in cert.versions.items()]
    out.append(_Section("Reproducibility", [(["fact", "value"], facts), (["package", "version"], versions)]))
    return out


def _smoothing_section(s: SmoothingSummary) -> _Section:
    settings = [
        ["sigma", _fmt(s.sigma)],
        ["n0 / n", f"{s.n0} / {s.n}"],
        ["alpha", _fmt(s.alpha)],
        ["examples", str(s.examples)],
        ["abstentions", str(s.abstentions)],
        ["l2 radius", _fmt(s.radius)],
        ["certified accuracy at the radius", _pct(s.certified_accuracy)],
        ["required for CERTIFIED", _pct(s.min_certified_accuracy)],
        ["noisy samples per second", f"{s.samples_per_second:.0f}"],
    ]
    text = (
        "The guarantee is about the smoothed classifier (the model under Gaussian noise, majority vote), "
        "not the base model: each of its predictions is constant within its certified l2 radius with "
        f"probability at least {1 - s.alpha:g} (Cohen et al. 2019, Clopper-Pearson bounds)."
    )
    blocks: list[_Block] = [text, (["setting", "value"], settings)]
    if s.curve:
        blocks += [_Plot("smoothing"), (["l2 radius", "certified accuracy"], [[_fmt(r), _pct(a)] for r, a in s.curve])]
    return _Section("Randomized smoothing", blocks)


def _training_section(cert: Certificate) -> _Section:
    objectives = [
        [str(o.get("name", "?")), _fmt(o.get("weight", 1.0)), _fmt(o.get("params") or {})] for o in cert.objectives
    ]
    blocks: list[_Block] = [f"Epochs planned: {_fmt(cert.epochs)}; epochs recorded: {len(cert.training)}."]
    if objectives:
        blocks.append((["objective", "weight", "parameters"], objectives))
    if cert.training:
        last = cert.training[-1]
        metrics = [[k, _pct(v) if k.endswith("_acc") else _fmt(v)] for k, v in last.items()]
        blocks += [_Plot("training"), f"Final epoch ({_fmt(last.get('epoch', len(cert.training)))}):"]
        blocks.append((["metric", "value"], metrics))
    return _Section("Training", blocks)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _headline(cert: Certificate) -> list[tuple[str, str, str, str]]:
    """``(id, title, value, detail)`` of the key figures."""
    out = [
        ("clean-accuracy", "Clean accuracy", _pct(cert.clean_accuracy), f"n = {cert.n}, 95% CI {_ci(cert, 'clean')}"),
        (
            "robust-accuracy",
            "Robust accuracy",
            _pct(cert.robust_accuracy),
            f"n = {cert.n}, 95% CI {_ci(cert, 'robust')}",
        ),
    ]
    s = cert.smoothing
    if s is not None:
        detail = f"smoothed classifier, l2 radius {_fmt(s.radius)}, sigma {_fmt(s.sigma)}, n = {s.examples}"
        out.append(("certified-accuracy", "Certified accuracy", _pct(s.certified_accuracy), detail))
    return out


def to_markdown(cert: Certificate) -> str:
    """Render ``cert`` as a Markdown document (``certificate.md``).

    Args:
        cert: the certificate.

    Returns:
        Markdown text: verdict, key figures, then one section per part of the certificate.

    Example:
        >>> from harden.certificate import Certificate
        >>> cert = Certificate(verdict="EMPIRICAL", verdict_reason="attack suite only", created="2025-01-01T00:00:00+00:00",
        ...     policy_name="demo", policy_sha256="ab" * 32, weights_sha256="cd" * 32, threat={"norm": "linf", "eps": 0.1},
        ...     n=200, clean_accuracy=0.98, robust_accuracy=0.965, per_attack={"pgd": 0.965},
        ...     attacks=[{"name": "pgd", "params": {"steps": 10}}], seed=0, device="cpu", versions={"harden": "0.1.0"})
        >>> md = to_markdown(cert)
        >>> md.splitlines()[0]
        '# Robustness certificate: demo'
        >>> "**EMPIRICAL**" in md, "96.50%" in md
        (True, True)
    """
    lines = [f"# Robustness certificate: {cert.policy_name}", ""]
    if cert.warnings:
        lines += ["> **Warnings**", ">"]
        lines += [f"> - {_md_cell(w)}" for w in cert.warnings]
        lines.append("")
    lines += [f"**{cert.verdict}**: {cert.verdict_reason or _DASH}", ""]
    lines += [f"- {title}: **{value}** ({detail})" for _, title, value, detail in _headline(cert)]
    lines.append("")
    for sec in _sections(cert):
        lines += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, str):
                lines += [block, ""]
            elif isinstance(block, tuple):
                lines += _md_table(*block)
    return "\n".join(lines).rstrip() + "\n"


def _html_cell(text: str, header: str) -> str:
    esc = html.escape(text)
    if header == "status" and text in _COLOURS:
        return f'<td><span class="badge s-{text}">{esc}</span></td>'
    if header == "id":
        return f'<td class="mono nowrap">{esc}</td>'
    if header == "hash":
        return f'<td class="mono">{esc}</td>'
    if header != "version" and re.fullmatch(r"-?[\d.]+%?|[\d.e+-]+ s", text):
        return f'<td class="num">{esc}</td>'
    return f"<td>{esc}</td>"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(_html_cell(c, h) for c, h in zip(row, head, strict=True)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def to_html(cert: Certificate) -> str:
    """Render ``cert`` as one self-contained HTML page (``certificate.html``).

    The page has inline CSS and inline PNG plots (accuracy vs eps, certified accuracy vs l2
    radius, training curves, saliency maps; each when the data is there), no scripts and no
    external URLs, so it reads offline. All text is HTML-escaped.

    Args:
        cert: the certificate.

    Returns:
        The HTML document.

    Example:
        >>> from harden.certificate import Certificate
        >>> cert = Certificate(verdict="EMPIRICAL", verdict_reason="attack suite only", created="2025-01-01T00:00:00+00:00",
        ...     policy_name="demo", policy_sha256="ab" * 32, weights_sha256="cd" * 32, threat={"norm": "linf", "eps": 0.1},
        ...     n=200, clean_accuracy=0.98, robust_accuracy=0.965, per_attack={"pgd": 0.965},
        ...     attacks=[{"name": "pgd"}], seed=0, device="cpu", versions={}, eps_curve=[(0.0, 0.98), (0.1, 0.965)])
        >>> page = to_html(cert)
        >>> '<span id="robust-accuracy">96.50%</span>' in page, "data:image/png;base64," in page, "http" in page
        (True, True, False)
    """
    title = f"Robustness certificate: {cert.policy_name}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if cert.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in cert.warnings)
        parts.append(
            f'<div class="warnings" id="warnings" role="alert"><strong>Warnings</strong><ul>{items}</ul></div>'
        )
    parts += [
        f'<p class="verdict">Verdict: <span id="verdict" class="badge s-{cert.verdict}">{html.escape(cert.verdict)}</span></p>',
        f'<p class="reason" id="verdict-reason">{html.escape(cert.verdict_reason or _DASH)}</p>',
        '<div class="cards">',
    ]
    for id_, name, value, detail in _headline(cert):
        parts.append(
            f'<div class="card"><div>{html.escape(name)}</div><div class="value"><span id="{id_}">'
            f'{html.escape(value)}</span></div><div class="sub">{html.escape(detail)}</div></div>'
        )
    parts.append("</div>")
    plots = certificate_plots(cert, _threat(cert))
    for sec in _sections(cert):
        parts.append(f'<section id="section-{_slug(sec.title)}"><h2>{html.escape(sec.title)}</h2>')
        for block in sec.blocks:
            if isinstance(block, str):
                parts.append(f"<p>{html.escape(block)}</p>")
            elif isinstance(block, tuple):
                parts.append(_html_table(*block))
            elif block.key in plots:
                parts.append(plots[block.key])
        parts.append("</section>")
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
