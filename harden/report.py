"""``harden.report``: a :class:`~harden.certificate.Certificate` as Markdown and as one HTML page.

Both renderings are built from the same sections (tables and paragraphs), so they say the same
things; the HTML page adds plots (matplotlib, Agg canvas, PNG inlined as ``data:`` URIs) and the
saliency maps, drawn by :mod:`harden.plots`. The HTML page is self-contained: inline CSS, no
scripts, fonts or external URLs, so it reads offline and can be archived next to
``certificate.json``.

The top of both, in order: the certificate's ``warnings`` (notes a reader must see), one line
per target (``Target: robust_accuracy >= 45%: FAIL (measured 4.0%)``), the verdict, the robust
accuracy (worst case over the suite) before and larger than the clean accuracy, the undefended
baseline's when there is one, and a summary of the exported ONNX model (parity, its own
black-box result, whether it agrees with the PyTorch verdict). Everywhere people read labels,
not the JSON keys. Stable element ids in the HTML page: ``warnings`` (when there are any),
``target-<i>`` per target, ``verdict``, ``robust-accuracy``, ``clean-accuracy``, when randomized
smoothing ran ``certified-accuracy``, ``onnx-summary`` when exported; each section has
``id="section-<slug>"``. The sections themselves (labels, tables, paragraphs) are built by
:mod:`harden.report_sections`.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

from harden.plots import certificate_plots
from harden.report_format import CLEAN_LABEL, DASH, ROBUST_LABEL, ci, fmt, pct, status_label, threat_text
from harden.report_sections import sections

if TYPE_CHECKING:
    from harden.certificate import Certificate

__all__ = ["to_html", "to_markdown"]

_COLOURS = {
    "CERTIFIED": ("#1a7f37", "#dafbe1"),
    "EMPIRICAL": ("#9a6700", "#fff8c5"),
    "UNRELIABLE": ("#cf222e", "#ffebe9"),
    "PASS": ("#1a7f37", "#dafbe1"),
    "WARN": ("#9a6700", "#fff8c5"),
    "FAIL": ("#cf222e", "#ffebe9"),
    "SKIP": ("#59636e", "#eaeef2"),
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
.target{font-size:1.15em;font-weight:700;padding:6px 12px;border-radius:6px;margin:.4em 0}
.card.primary{border:2px solid #1f2328}.card.primary .value{font-size:3em}
.onnx{border:1px solid #d0d7de;border-radius:8px;padding:6px 16px;margin:.6em 0 1em}.onnx p{margin:.3em 0}
""" + "".join(f".s-{k}{{color:{fg};background:{bg}}}" for k, (fg, bg) in _COLOURS.items())


def _frac(x: float | None) -> str:
    """A short percentage for prose: ``4.0%``."""
    return DASH if x is None else f"{x:.1%}"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _targets(cert: Certificate) -> list[tuple[str, str]]:
    """``(status, line)`` per requirement: ``Target: robust_accuracy >= 45%: FAIL (measured 4.0%)``."""
    out = []
    for r in cert.requirements:
        measured = "not measured" if r.actual is None else f"measured {_frac(r.actual)}"
        status = "PASS" if r.passed else "FAIL"
        if r.passed and cert.verdict == "UNRELIABLE" and r.metric not in ("clean_accuracy", "certified_accuracy"):
            status, measured = (
                "FAIL",
                f"{measured}, but the evaluation is UNRELIABLE: the figure may overstate robustness",
            )
        out.append((status, f"Target: {r.text}: {status} ({measured})"))
    return out


def _onnx_summary(cert: Certificate) -> list[str]:
    """The exported ONNX model in a few lines: parity, its own black-box figures, agreement with PyTorch."""
    ex, ob = cert.export, cert.onnx_black_box
    if not ex and not ob:
        return []
    out = []
    if ex:
        line = (
            f"Exported ONNX model: onnxruntime matches PyTorch on {fmt(ex.get('parity_examples'))} inputs "
            f"(largest logit difference {fmt(ex.get('parity_max_abs_diff'))}, same class on "
            f"{pct(ex.get('parity_argmax_agreement'))})"
        )
        if ex.get("parity_adversarial_examples"):
            line += (
                f" and on {fmt(ex.get('parity_adversarial_examples'))} adversarial inputs (same class on "
                f"{pct(ex.get('parity_adversarial_argmax_agreement'))})"
            )
        out.append(line + ".")
    if ob:
        out.append(
            f"The ONNX session attacked itself (gradient-free attacks, n = {fmt(ob.get('n'))}): robust accuracy "
            f"{pct(ob.get('robust_accuracy'))}, clean accuracy {pct(ob.get('clean_accuracy'))}."
        )
        check = cert.checks.get("onnx_black_box")
        if check:
            status = status_label(check.get("status", "?"))
            out.append(f"Agreement with the PyTorch verdict: {status}, {check.get('detail', '')}")
    else:
        out.append("The ONNX session itself was not attacked (export.verify_examples is 0, or not run by harden run).")
    return out


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _headline(cert: Certificate) -> list[tuple[str, str, str, str]]:
    """``(id, title, value, detail)`` of the key figures, the robust accuracy first."""
    t = threat_text(cert)
    out = [
        (
            "robust-accuracy",
            ROBUST_LABEL,
            pct(cert.robust_accuracy),
            f"under {t}; n = {cert.n}, 95% CI {ci(cert, 'robust')}",
        ),
        ("clean-accuracy", CLEAN_LABEL, pct(cert.clean_accuracy), f"n = {cert.n}, 95% CI {ci(cert, 'clean')}"),
    ]
    s = cert.smoothing
    if s is not None:
        detail = f"smoothed classifier, l2 radius {fmt(s.radius)}, sigma {fmt(s.sigma)}, n = {s.examples}"
        out.append(("certified-accuracy", "Certified accuracy", pct(s.certified_accuracy), detail))
    b = cert.baseline
    if b is not None:
        detail = f"undefended model on the same {b.n} examples; clean accuracy {pct(b.clean_accuracy)}"
        out.append(("baseline-robust-accuracy", "Undefended baseline, robust accuracy", pct(b.robust_accuracy), detail))
    return out


def _plain(cert: Certificate) -> str:
    """One sentence no reader can misread: right under attack, out of how many, against clean."""
    right = round(cert.robust_accuracy * cert.n)
    return (
        f"Under attack the model classifies {_frac(cert.robust_accuracy)} of the {cert.n} examples right "
        f"({right} of {cert.n}); without attack, {_frac(cert.clean_accuracy)}."
    )


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
    targets = _targets(cert)
    lines += [f"**{_md_cell(line)}**" + ("  " if i < len(targets) - 1 else "") for i, (_, line) in enumerate(targets)]
    lines += [""] if targets else []
    lines += [f"**{cert.verdict}**: {cert.verdict_reason or DASH}", ""]
    (_, title, value, detail), *rest = _headline(cert)
    lines += [f"### {title}: {value}", "", f"{detail}. {_plain(cert)}", ""]
    lines += [f"- {title}: **{value}** ({detail})" for _, title, value, detail in rest]
    lines.append("")
    onnx = _onnx_summary(cert)
    lines += [f"> {_md_cell(line)}" + ("  " if i < len(onnx) - 1 else "") for i, line in enumerate(onnx)]
    lines += [""] if onnx else []
    for sec in sections(cert):
        lines += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, str):
                lines += [block, ""]
            elif isinstance(block, tuple):
                lines += _md_table(*block)
    return "\n".join(lines).rstrip() + "\n"


def _html_cell(text: str, header: str) -> str:
    esc = html.escape(text)
    if header == "status" and text.split(" ")[0] in _COLOURS:
        return f'<td><span class="badge s-{text.split(" ")[0]}">{esc}</span></td>'
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
    for i, (status, line) in enumerate(_targets(cert)):
        parts.append(f'<p class="target s-{status}" id="target-{i}">{html.escape(line)}</p>')
    parts += [
        f'<p class="verdict">Verdict: <span id="verdict" class="badge s-{cert.verdict}">{html.escape(cert.verdict)}</span></p>',
        f'<p class="reason" id="verdict-reason">{html.escape(cert.verdict_reason or DASH)}</p>',
        '<div class="cards">',
    ]
    for i, (id_, name, value, detail) in enumerate(_headline(cert)):
        parts.append(
            f'<div class="card{" primary" if i == 0 else ""}"><div>{html.escape(name)}</div><div class="value">'
            f'<span id="{id_}">{html.escape(value)}</span></div><div class="sub">{html.escape(detail)}</div></div>'
        )
    parts += ["</div>", f'<p id="plain">{html.escape(_plain(cert))}</p>']
    onnx = _onnx_summary(cert)
    if onnx:
        parts.append(
            '<div class="onnx" id="onnx-summary">' + "".join(f"<p>{html.escape(x)}</p>" for x in onnx) + "</div>"
        )
    plots = certificate_plots(cert, threat_text(cert))
    for sec in sections(cert):
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
