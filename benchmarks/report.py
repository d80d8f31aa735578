"""Assemble ``benchmarks/RESULTS.md`` from the sections the benchmark scripts wrote.

Every script writes ``results/<name>.md`` and ``results/<name>.json``. With ``--run ID`` (what
``make bench`` passes) the report has two parts: the sections measured in that run, under a
summary table of their headline ratios, and after them the sections kept from earlier runs
(larger ``--size`` runs, or GPU runs), each still dated and named with its machine and command.
A section that ``make bench`` should have written in this run but did not is an error.

    python benchmarks/report.py                      # every section, newest layout
    python benchmarks/report.py --run 20261124T150000 --expect attacks training --size small --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import HERE, RESULTS, machine, section_name, table

#: section order; "gpu" is the summary of `make gpu-check` (benchmarks/gpu_check.py), first when present
ORDER = ["gpu", "attacks", "iwd", "objectives", "training", "certify", "inference"]
#: the section (file stem) each script writes at size small on cpu
SECTION = {
    "attacks": "attacks",
    "iwd_cost": "iwd",
    "objectives": "objectives",
    "bn_ablation": "objectives-bn",
    "training": "training",
    "certify": "certify",
    "inference": "inference",
    "demo": "demo",
}


def expected_sections(scripts: list[str], size: str, device: str) -> list[str]:
    """The section names ``scripts`` write at ``size`` on ``device``.

    Example:
        >>> expected_sections(["iwd_cost", "training"], "full", "cuda")
        ['iwd-full-cuda', 'training-full-cuda']
    """
    unknown = sorted(set(scripts) - set(SECTION))
    if unknown:
        raise SystemExit(f"report.py: unknown benchmark {', '.join(unknown)}; known: {', '.join(SECTION)}")
    return [section_name(SECTION[s], size, device) for s in scripts]


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--run``, ``--expect``, ``--results``, ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="the make-bench run id; its sections come first")
    ap.add_argument("--expect", nargs="*", default=[], help="scripts (attacks, training, ...) this run ran")
    ap.add_argument("--size", default="small", help="the size the expected scripts ran at")
    ap.add_argument("--device", default="cpu", help="the device the expected scripts ran on")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the scripts' sections")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="the report to write")
    return ap


def _rank(stem: str) -> tuple[int, str]:
    base = stem.split("-")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), stem)


def _meta(md: Path) -> dict[str, Any]:
    js = md.with_suffix(".json")
    try:
        return dict(json.loads(js.read_text()))
    except (OSError, ValueError):
        return {}


def _summary(sections: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    rows = [
        [h["what"], h["measured"], h["reference"], h["ratio"], h.get("note", ""), f"[{md.stem}](#{_anchor(md)})"]
        for md, meta in sections
        for h in meta.get("headlines", [])
    ]
    if not rows:
        return []
    return [
        "## Summary: each measurement beside its reference",
        "",
        *table(["measurement", "harden", "reference", "ratio", "note", "section"], rows),
        "",
    ]


def _anchor(md: Path) -> str:
    title = md.read_text().splitlines()[0].lstrip("# ").strip().lower()
    keep = "".join(c for c in title if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def assemble(results: Path, run: str | None, expect: list[str]) -> str:
    """The text of RESULTS.md from the sections in ``results`` (see the module docstring).

    Raises:
        SystemExit: a section named in ``expect`` is missing or was not written by ``run``.
    """
    sections = [(md, _meta(md)) for md in sorted(results.glob("*.md"), key=lambda p: _rank(p.stem))]
    if run is None:
        current, earlier = sections, []
    else:
        current = [(md, m) for md, m in sections if m.get("run") == run]
        earlier = [(md, m) for md, m in sections if m.get("run") != run]
    missing = sorted(set(expect) - {md.stem for md, _ in current})
    if missing:
        raise SystemExit(
            f"report.py: run {run!r} did not write {', '.join(missing)}: a benchmark failed or was skipped"
        )
    parts = [
        "# harden benchmarks",
        "",
        "Written by `benchmarks/report.py` from the sections the scripts in `benchmarks/` wrote "
        "(`make bench` runs them all at their default size, then this). Each section names the machine it was "
        "measured on, the date, the commit and the command that reproduces it.",
        f"Assembled on: {machine()}.",
        "",
    ]
    if run is not None:
        parts += [f"Sections measured in run `{run}` (`make bench`) come first; older runs follow.", ""]
    parts += _summary(current)
    for md, _ in current:
        parts += [md.read_text().rstrip(), ""]
    if earlier:
        parts += [
            "# Kept from earlier runs",
            "",
            "Not re-measured by the last `make bench` (larger `--size` runs take hours on 2 cores; GPU runs need a "
            "GPU). Each keeps its own date, machine, commit and command.",
            "",
        ]
        parts += _summary(earlier)
        for md, _ in earlier:
            parts += [md.read_text().rstrip(), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> Path:
    """Write the report; returns its path."""
    args = build_parser().parse_args(argv)
    text = assemble(args.results, args.run, expected_sections(args.expect, args.size, args.device))
    args.out.write_text(text)
    n = text.count("\nMeasured ")
    print(f"wrote {args.out} ({n} sections)")
    return args.out


if __name__ == "__main__":
    main()
