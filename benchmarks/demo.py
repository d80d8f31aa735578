"""The demo, end to end: ``harden run`` of each demo policy, timed, and the two compared on the same examples.

``make demo`` is ``harden run POLICY --out DIR``: fit, verify (the attack suite and the sanity
checks), certify (randomized smoothing where the policy asks), export ONNX with its parity test,
and attack the exported ONNX session. This script runs it as ``make demo`` does, in a subprocess,
for ``policies/mnist-pgd.yaml`` (``pgd_at`` alone) and ``policies/mnist-mixed.yaml`` (the four
seed objectives mixed with ``pgd_at``), and reports:

- the wall time of the whole command (the demo time; goal <= 5 min on 2 cores) and its stages
  from ``certificate.json`` (fit, verify, export; the rest is certification, the ONNX session's
  attacks and start-up);
- clean and robust accuracy (the worst case over the white-box then black-box l_inf suite both
  policies share, n = 1,000) and the verdict;
- McNemar's exact test of the mixed run against the ``pgd_at`` run on the same test examples,
  clean and robust (one seed: a paired test of these two models, not of the recipes; the recipes
  are compared over seeds in ``objectives.py``).

Sizes (times on 2 cores):

- ``small`` (smoke, ~8 min): each policy with 1 epoch and 200 verified examples.
- ``medium`` (~25 min): the policies as shipped, the figures README quotes.

    python benchmarks/demo.py --size medium
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, write_section

from harden.compare import mcnemar
from harden.policy_io import dump_policy, load_policy, validate_policy

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"pgd_at": "mnist-pgd", "mixed": "mnist-mixed"}
SIZES: dict[str, dict[str, Any]] = {
    "small": {"smoke": True, "epochs": 1, "n": 200},
    "medium": {},
}
GOAL_S = 300.0
#: a demo that takes longer than this is stopped (and reported as a failure)
TIMEOUT_S = 3600


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default) or cuda[:N]: the policies' device")
    ap.add_argument("--only", choices=list(POLICIES), default=None, help="run one policy (no comparison)")
    return ap


def policy_file(name: str, size: dict[str, Any], device: str, tmp: Path) -> Path:
    """The shipped policy, or a copy with this size's overrides and device."""
    path = ROOT / "policies" / f"{POLICIES[name]}.yaml"
    if not size and device == "cpu":
        return path
    data = load_policy(path).model_dump()
    data["device"] = device
    if "epochs" in size:
        data["train"]["epochs"] = size["epochs"]
        data["verify"]["n_examples"] = size["n"]
        data["verify"]["check_examples"] = min(data["verify"]["check_examples"], size["n"])
    out = tmp / f"{name}.yaml"
    out.write_text(dump_policy(validate_policy(data)))
    return out


def run_demo(policy: Path, out: Path) -> dict[str, Any]:
    """``harden run POLICY --out OUT`` in a subprocess: wall seconds, certificate and per-example outcomes."""
    cmd = [sys.executable, "-m", "harden", "run", str(policy), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"demo.py: {' '.join(cmd)} ran past {TIMEOUT_S} s") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo.py: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    cert = json.loads((out / "certificate.json").read_text())
    broken = json.loads((out / "report.json").read_text())["outcomes"]["broken_by"]
    return {
        "wall_s": wall,
        "timings": cert.get("timings", {}),
        "clean": cert["clean_accuracy"],
        "robust": cert["robust_accuracy"],
        "verdict": cert["verdict"],
        "n": cert["n"],
        "right": {"clean": [b != "clean" for b in broken], "robust": [b == "" for b in broken]},
    }


def main(argv: list[str] | None = None) -> Path:
    """Run the demo policies, write the ``demo`` section; returns its path."""
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [args.only] if args.only else POLICIES:
            runs[name] = run_demo(policy_file(name, size, args.device, Path(tmp)), Path(tmp) / name)
            print(name, f"{runs[name]['wall_s']:.0f} s", runs[name]["clean"], runs[name]["robust"], flush=True)
    rows = []
    for name, r in runs.items():
        t = r["timings"]
        rest = r["wall_s"] - sum(float(t.get(k, 0.0)) for k in ("fit", "verify", "export"))
        rows.append(
            [
                f"`{POLICIES[name]}`",
                f"{r['wall_s']:.0f} s ({r['wall_s'] / 60:.1f} min)",
                *(f"{float(t.get(k, 0.0)):.0f}" for k in ("fit", "verify", "export")),
                f"{rest:.0f}",
                f"{r['clean']:.1%}",
                f"{r['robust']:.1%}",
                r["verdict"],
            ]
        )
    tests = (
        {m: mcnemar(runs["mixed"]["right"][m], runs["pgd_at"]["right"][m]) for m in ("clean", "robust")}
        if len(runs) == 2
        else {}
    )
    heads = [
        headline(
            f"make demo ({POLICIES[name]}), whole harden run, s",
            f"{r['wall_s']:.0f}",
            f"{GOAL_S:.0f}",
            f"{r['wall_s'] / GOAL_S:.2f}x",
            f"goal <= 5 min: {'met' if r['wall_s'] <= GOAL_S else 'NOT met'}"
            + ("; smoke scale" if size.get("smoke") else ""),
        )
        for name, r in runs.items()
    ]
    lines = [
        "`harden run POLICY --out DIR --quiet` in a subprocess, as `make demo` runs it"
        + (f" (smoke: {size['epochs']} epoch, {size['n']} verified examples)" if size.get("smoke") else "")
        + f"; n = {next(iter(runs.values()))['n']} test examples each, the same ones. Stages in seconds from "
        "certificate.json; `rest` = certification (smoothing), the ONNX session's attacks and start-up.",
        "",
        *table(["policy", "demo time", "fit", "verify", "export", "rest", "clean", "robust", "verdict"], rows),
        "",
    ]
    if tests:
        lines += [
            "Mixed against `pgd_at`, the same examples (one seed each; +b/-c: right only in the mixed / only in "
            "the pgd_at model): " + "; ".join(f"{m} +{b}/-{c}, McNemar p = {p:.2g}" for m, (b, c, p) in tests.items()),
            "",
        ]
    return write_section(
        section_name("demo", args.size, args.device, args.only or ""),
        f"The demo end to end ({args.size}, {args.device})",
        f"python benchmarks/demo.py --size {args.size} --device {args.device}"
        + (f" --only {args.only}" if args.only else ""),
        lines,
        {
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "right"} for k, v in runs.items()},
            "mcnemar_mixed_vs_pgd": {m: {"b": b, "c": c, "p": p} for m, (b, c, p) in tests.items()},
        },
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
