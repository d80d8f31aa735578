"""Assemble ``benchmarks/RESULTS.md`` from the sections the benchmark scripts wrote."""

from __future__ import annotations

from common import HERE, RESULTS, machine

ORDER = ["attacks", "iwd", "objectives", "training", "certify", "inference"]


def main() -> None:
    def rank(stem: str) -> int:
        base = stem.split("-")[0]
        return ORDER.index(base) if base in ORDER else len(ORDER)

    sections = sorted(RESULTS.glob("*.md"), key=lambda p: (rank(p.stem), p.stem))
    parts = [
        "# harden benchmarks",
        "",
        "Written by the scripts in `benchmarks/` (`make bench` runs them all). Each section names the",
        "machine it was measured on, the date, the commit and the command that reproduces it.",
        f"Last assembled on: {machine()}.",
        "",
    ]
    for s in sections:
        parts.append(s.read_text().rstrip())
        parts.append("")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} ({len(sections)} sections)")


if __name__ == "__main__":
    main()
