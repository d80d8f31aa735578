"""The benchmark scripts' contract (benchmarks never *run* in the test suite; their CLIs and report do).

Every script in ``benchmarks/`` (other than the shared ``common.py`` and ``report.py``) must be run
by ``make bench``, take ``--size`` (default ``small``) and ``--device``, and write the section
``report.py`` expects; ``report.py`` must put this run's sections first and refuse a run that did
not write one of them.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
#: `make bench`'s scripts; gpu_*.py are `make gpu-check` and its helpers (tests/test_gpu_check.py)
SCRIPTS = sorted(
    p.stem for p in BENCH.glob("*.py") if p.stem not in {"common", "report"} and not p.stem.startswith("gpu_")
)


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_every_script_is_run_by_make_bench_and_known_to_the_report() -> None:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^BENCHES\s*:=\s*(.+)$", makefile, flags=re.MULTILINE)
    assert match is not None, "Makefile has no BENCHES list"
    assert sorted(match.group(1).split()) == SCRIPTS
    assert sorted(_load("report").SECTION) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_cli_contract(script: str) -> None:
    module = _load(script)
    parser = module.build_parser()
    defaults = parser.parse_args([])
    assert defaults.size == "small"
    assert defaults.device == "cpu"
    size_action = next(a for a in parser._actions if "--size" in a.option_strings)
    assert "small" in size_action.choices
    assert len(size_action.choices) >= 2, f"{script} has no larger size"
    for size in size_action.choices:
        args = parser.parse_args(["--size", size, "--device", "cuda", "--results", "/tmp/x"])
        assert (args.size, args.device, str(args.results)) == (size, "cuda", "/tmp/x")
    assert callable(module.main)


def test_section_names() -> None:
    common = _load("common")
    assert common.section_name("training", "small", "cpu") == "training"
    assert common.section_name("training", "full", "cpu") == "training-full"
    assert common.section_name("objectives-bn", "medium", "cuda:0") == "objectives-bn-medium-cuda0"
    report = _load("report")
    assert report.expected_sections(["bn_ablation", "iwd_cost"], "small", "cuda") == ["objectives-bn-cuda", "iwd-cuda"]
    with pytest.raises(SystemExit, match="unknown benchmark nope"):
        report.expected_sections(["nope"], "small", "cpu")


def _section(results: Path, name: str, title: str, run: str, heads: list[dict[str, str]]) -> None:
    (results / f"{name}.md").write_text(f"## {title}\n\nMeasured 2026-11-24 on: a machine.\n\n| a |\n|---|\n| 1 |\n")
    (results / f"{name}.json").write_text(json.dumps({"run": run, "headlines": heads}))


def test_report_puts_this_run_first_with_its_headlines(tmp_path: Path) -> None:
    common, report = _load("common"), _load("report")
    _section(
        tmp_path, "training", "Training overhead", "r2", [common.headline("epoch s", "1.0", "1.1", "0.91x", "met")]
    )
    _section(tmp_path, "attacks-full", "Attacks (full)", "r1", [common.headline("PGD-40 s", "24", "23", "1.03x")])
    _section(tmp_path, "attacks", "Attacks (small)", "r2", [])
    text = report.assemble(tmp_path, "r2", ["attacks", "training"])
    kept = text.index("# Kept from earlier runs")
    assert (
        text.index("## Attacks (small)") < text.index("## Training overhead") < kept < text.index("## Attacks (full)")
    )
    assert "| epoch s | 1.0 | 1.1 | 0.91x | met | [training](#training-overhead) |" in text
    assert text.index("| epoch s |") < kept < text.index("| PGD-40 s |")
    every = report.assemble(tmp_path, None, [])
    assert "Kept from earlier runs" not in every and every.count("\nMeasured ") == 3


def test_report_refuses_a_run_that_missed_a_section(tmp_path: Path) -> None:
    report = _load("report")
    _section(tmp_path, "attacks", "Attacks", "r2", [])
    _section(tmp_path, "training", "Training", "r1", [])  # left over from an earlier run
    with pytest.raises(SystemExit, match="did not write training"):
        report.assemble(tmp_path, "r2", ["attacks", "training"])
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == out
    assert out.read_text().startswith("# harden benchmarks")
