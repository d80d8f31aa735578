"""``make gpu-check``: prove harden's CUDA paths on one GPU in under 8 minutes, or dry-run them on the CPU.

Five steps, in order, each timed; a failing step is reported with its reason and the later
steps still run (they do not depend on each other's results), and the exit code is 1 when any
step failed:

1. ``environment``: torch, CUDA, cuDNN, the GPU, onnxruntime's package and providers; the CUDA
   libraries that onnxruntime's CUDA/TensorRT providers name against those torch's wheels
   name (same sonames, same CUDA major; see ``gpu_env.py``, checked from the files, so on the
   CPU too). On a GPU, a CUDA session runs and the CUDA library files actually loaded are listed.
2. ``gpu_tests``: ``pytest -m gpu`` on the test files that hold tests marked ``gpu``. On a GPU
   every one must pass (only the two-GPU test may skip, on one GPU); on the CPU every one must
   skip, each with its reason.
3. ``pipeline``: ``harden run policies/mnist-gpu.yaml`` (CUDA, bf16 training with float32
   attacks, the whole run with ONNX export and the ONNX session attacked on onnxruntime's CUDA
   provider), then ``harden verify --onnx --onnx-device cuda``, then the parity of the torch CUDA
   model with the ONNX CUDA sessions (float32 and float16, IO binding) on clean and PGD inputs at
   the bounds stated in ``gpu_pipeline.py``. On the CPU: the same policy made tiny, on the CPU.
4. ``bench``: ``make bench``'s inference, certify, attacks and training scripts at ``--size
   small --device cuda`` (inference at batches 1, 64 and 256, TensorRT rows when its provider
   loads), in that order (the budget cuts the last first), then RESULTS.md reassembled; each
   must have written its CUDA section in this run (inference: with CUDA rows). On the CPU:
   skipped, after checking that the four command lines parse.
5. ``ddp``: ``torchrun`` with one process per GPU (NCCL) fitting the GPU policy for one epoch,
   when more than one GPU is visible; skipped with the reason otherwise.

Everything measured goes under ``--out`` (default ``runs/gpu-check``): ``gpu-check.json`` and
``gpu-check.md`` (rewritten after every step, so a run killed from outside keeps what it did),
``logs/<step>.log`` and, on CUDA, ``results/`` with this run's benchmark sections and RESULTS.md;
``--archive FILE.tar.gz`` packs the folder into one file. On CUDA the summary is also written as
the ``gpu-check-cuda`` section of ``benchmarks/results``.

Sizes and times: one size. The whole check has ``--budget`` seconds (450 by default, counted
from the start of this process, so that it ends inside 8 minutes), and each step has at most
``LIMITS`` of it (the bench step gets what is left, less the DDP step's share when there are
two GPUs); every subprocess runs in its own process group and is killed at its limit, and one
is not started with under 15 s left. Work the budget cut is reported as FAIL, "not run" or
"stopped after N s": it was not proven. The CPU dry run takes about 3 minutes on 2 cores.

    python benchmarks/gpu_check.py                  # on a GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu     # the dry run (make gpu-check DEVICE=cpu)
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here, before torch is imported

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the scripts' helpers, and harden without installing it
from common import machine, table, write_section  # noqa: E402
from gpu_steps import GPU_POLICY, ROOT, Check, Step, tail  # noqa: E402

#: make bench's scripts, most wanted first: the budget cuts the last
BENCHES = ["inference", "certify", "attacks", "training"]
#: modules harden imports (a machine's own Python may lack some: the run stops and names them)
REQUIRED = [
    "pydantic",
    "ot",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "timm",
    "safetensors",
    "mlxtend",
    "sklearn",
    "scipy",
    "matplotlib",
    "tqdm",
    "torchvision",
]
#: what the test and bench steps import besides (their steps fail naming them when missing)
STEP_REQUIRED = {"gpu_tests": ["pytest", "hypothesis"], "bench": ["torchattacks"]}
#: seconds each step may take at most (the budget caps the sum; bench takes what is left)
LIMITS = {"environment": 60, "gpu_tests": 90, "pipeline": 170, "bench": 10_000, "ddp": 40}
#: the skip reason a gpu test may give on a machine with one GPU
TWO_GPUS = "NCCL DDP needs two or more GPUs"
SUMMARY = re.compile(
    r"^=*\s*((\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?),? ?)+) in [\d.]+s"
)


def _missing(names: list[str]) -> list[str]:
    return [m for m in names if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------- step 2
def gpu_test_files() -> list[str]:
    """The test files that hold tests marked ``gpu`` (only these are collected: faster, fewer imports)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's final summary line (the last one in ``text``), e.g. ``{"passed": 3}``.

    Example:
        >>> pytest_counts("x\\n== 2 failed, 5 passed, 1 warning in 3.10s ==\\nlong warning text")
        {'failed': 2, 'passed': 5, 'warning': 1}
    """
    lines = [m for line in text.splitlines() if (m := SUMMARY.match(line.strip()))]
    if not lines:
        return {}
    return {k: int(v) for v, k in re.findall(r"(\d+) (\w+)", lines[-1].group(1))}


def step_gpu_tests(c: Check, limit: float) -> Step:
    """``pytest -m gpu``: all pass on a GPU (the two-GPU test may skip on one); all skip, with reasons, on the CPU."""
    missing = _missing(STEP_REQUIRED["gpu_tests"])
    if missing:
        return Step("gpu_tests", "FAIL", 0.0, f"not run: the tests need {', '.join(missing)}, not installed")
    files = gpu_test_files()
    cmd = [c.python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", *files]
    rc, text = c.call("gpu_tests", cmd, limit)
    counts = pytest_counts(text)
    passed, skipped = counts.get("passed", 0), counts.get("skipped", 0)
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    reasons = sorted({m.strip() for m in re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.+)", text)})
    data = {"exit": rc, "counts": counts, "skip_reasons": reasons, "files": files}
    if rc == 124:
        return Step("gpu_tests", "FAIL", 0.0, f"pytest did not finish: {tail(text)}", data)
    if rc == 5 or not counts:
        return Step("gpu_tests", "FAIL", 0.0, f"no gpu test ran (pytest exit {rc}): {tail(text, 2)}", data)
    if c.cuda:
        odd = [r for r in reasons if r != TWO_GPUS]
        ok = rc == 0 and failed == 0 and passed > 0 and not odd
        detail = f"{passed} passed, {skipped} skipped, {failed} failed"
        detail += f"; skipped: {'; '.join(reasons)}" if reasons else ""
        detail += "" if ok else f": {tail(text, 3)}"
        return Step("gpu_tests", "PASS" if ok else "FAIL", 0.0, detail, data)
    ok = rc == 0 and passed == 0 and failed == 0 and skipped > 0 and len(reasons) > 0
    detail = f"{skipped} CUDA tests skip on the CPU with their reasons ({'; '.join(reasons)})"
    return Step(
        "gpu_tests",
        "PASS" if ok else "FAIL",
        0.0,
        detail if ok else f"expected every gpu test to skip, got {counts}: {tail(text, 2)}",
        data,
    )


# ---------------------------------------------------------------- steps 4 and 5
def _bench_written(name: str, run_id: str) -> str | None:
    """Why the CUDA section of ``name`` is not this run's (None when it is)."""
    js = HERE / "results" / f"{name}-cuda.json"
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return f"{name}: no {js.name} written"
    if meta.get("run") != run_id:
        return f"{name}: {js.name} is not from this run"
    if name == "inference" and not any(r.get("device") == "cuda" and "images_per_s" in r for r in meta.get("rows", [])):
        return f"inference: no CUDA rows ({meta.get('gpu', 'no reason given')})"
    return None


def step_bench(c: Check, limit: float) -> Step:
    """``make bench``'s GPU sections (inference, certify, attacks, training) on CUDA."""
    cmds = {b: [c.python, f"benchmarks/{b}.py", "--size", "small", "--device", "cuda"] for b in BENCHES}
    if not c.cuda:  # parse the exact command lines with each script's own parser (in this process: fast)
        bad = {}
        for b, cmd in cmds.items():
            try:
                importlib.import_module(b).build_parser().parse_args(cmd[2:])
            except SystemExit as exc:
                bad[b] = f"argparse exit {exc.code}"
            except Exception as exc:
                bad[b] = f"{type(exc).__name__}: {exc}"
        if bad:
            return Step("bench", "FAIL", 0.0, f"benchmark command lines do not parse: {bad}", {"commands": cmds})
        return Step(
            "bench", "SKIP", 0.0, f"needs CUDA; the {len(cmds)} benchmark command lines parse", {"commands": cmds}
        )
    missing = _missing(STEP_REQUIRED["bench"])
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    problems, seconds, done = [], {}, []
    t0 = time.monotonic()
    for b, cmd in cmds.items():
        if b == "attacks" and missing:
            problems.append(f"attacks: not run, needs {', '.join(missing)}")
            continue
        s = time.monotonic()
        rc, text = c.call("bench", cmd, limit - (time.monotonic() - t0), env={"HARDEN_BENCH_RUN": run_id})
        seconds[b] = round(time.monotonic() - s, 1)
        why = f"{b} exited {rc}: {tail(text)}" if rc != 0 else _bench_written(b, run_id)
        problems += [why] if why else []
        done += [] if why else [b]
    data = {"commands": cmds, "seconds": seconds, "run": run_id, "written": done}
    detail = "; ".join(problems) if problems else ", ".join(f"{b} {s:.0f} s" for b, s in seconds.items())
    return Step("bench", "FAIL" if problems else "PASS", 0.0, detail, data)


def step_ddp(c: Check, limit: float) -> Step:
    """One epoch of the GPU policy under torchrun, one NCCL process per GPU, when there are two or more."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        why = "no GPU" if gpus == 0 else "one GPU visible"
        return Step("ddp", "SKIP", 0.0, f"{why} (torch.cuda.device_count() = {gpus}): NCCL DDP needs two or more", {})
    raw = yaml.safe_load(GPU_POLICY.read_text())
    raw["train"]["epochs"] = 1
    policy_file = c.out / "mnist-gpu-ddp.yaml"
    policy_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = c.out / "ddp"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        c.python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "harden",
        "fit",
        str(policy_file),
        "--out",
        str(run_dir),
        "-q",
    ]
    rc, text = c.call("ddp", cmd, limit)
    ok = rc == 0 and (run_dir / "model.safetensors").is_file()
    detail = f"{gpus} NCCL processes fitted one epoch" if ok else f"torchrun exited {rc}: {tail(text, 2)}"
    return Step("ddp", "PASS" if ok else "FAIL", 0.0, detail, {"gpus": gpus, "exit": rc})


# ---------------------------------------------------------------- main
def timed_step(c: Check, name: str, fn: Callable[[], Step]) -> Step:
    """Run one step with its clock; an exception is that step's FAIL, with its one-line reason."""
    t0 = time.monotonic()
    if c.remaining() <= 1:
        step = Step(name, "FAIL", 0.0, f"not run: the {c.budget:.0f} s budget was spent before it")
    else:
        try:
            step = fn()
        except Exception as exc:  # a broken step must not hide the others
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            step = Step(name, "FAIL", 0.0, f"{type(exc).__name__}: {first}")
    step.seconds = time.monotonic() - t0
    print(f"gpu-check: {step.name:<12} {step.status:<4} {step.seconds:6.1f} s  {step.detail}", flush=True)
    return step


def report(c: Check, steps: list[Step]) -> list[str]:
    """The Markdown lines of the summary (also the benchmark section on CUDA)."""
    mode = "on CUDA" if c.cuda else "dry run on the CPU (CUDA steps skip)"
    total = time.monotonic() - c.start
    lines = [f"`make gpu-check` {mode}: {total:.0f} s in all (budget {c.budget:.0f} s).", ""]
    lines += table(
        ["step", "status", "seconds", "detail"],
        [[s.name, s.status, f"{s.seconds:.1f}", s.detail.replace("|", "/")] for s in steps],
    )
    parity = next((s.data.get("parity") for s in steps if s.name == "pipeline"), None)
    if parity and parity.get("rows"):
        lines += [
            "",
            f"ONNX vs torch logits on {parity['device']} ({parity['n']} test images and their PGD-20 examples):",
            "",
        ]
        lines += table(
            ["session", "inputs", "max abs diff", "bound", "argmax agreement", "near-ties", "ok"],
            [
                [
                    r["session"],
                    r["inputs"],
                    f"{r['max_abs_diff']:.2e}",
                    "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}",
                    f"{r['argmax_agreement']:.1%}",
                    str(r["near_ties"]),
                    {True: "yes", False: "NO", None: "info"}[r["ok"]],
                ]
                for r in parity["rows"]
            ],
        )
    return lines


def write_summary(c: Check, steps: list[Step]) -> dict[str, Any]:
    """``gpu-check.json`` and ``gpu-check.md`` as they stand (called after every step)."""
    summary = {
        "device": "cuda" if c.cuda else "cpu",
        "machine": machine(),
        "budget": c.budget,
        "seconds": time.monotonic() - c.start,
        "steps": [asdict(s) for s in steps],
    }
    summary = json.loads(json.dumps(summary, default=str))
    (c.out / "gpu-check.json").write_text(json.dumps(summary, indent=1))
    (c.out / "gpu-check.md").write_text("\n".join(report(c, steps)) + "\n")
    return summary


def finish(c: Check, args: argparse.Namespace, steps: list[Step]) -> int:
    """Write the summary; on CUDA the section and RESULTS.md with this run's sections; the archive."""
    summary = write_summary(c, steps)
    if c.cuda:
        write_section("gpu-check-cuda", "GPU check (make gpu-check)", "make gpu-check", report(c, steps), summary)
        bench = next((s for s in steps if s.name == "bench"), None)
        written = bench.data.get("written", []) if bench else []
        run = bench.data.get("run", "") if bench else ""
        cmd = [c.python, "benchmarks/report.py", "--size", "small", "--device", "cuda"]
        cmd += ["--run", run, "--expect", *written] if written else []
        rc, text = c.call("report", cmd, min(60.0, max(c.remaining(), 20.0)))
        if rc != 0:
            print(f"gpu-check: report.py exited {rc}: {tail(text)}", flush=True)
        out = c.out / "results"
        out.mkdir(exist_ok=True)
        for stem in ["gpu-check-cuda", *(f"{b}-cuda" for b in written)]:
            for ext in ("md", "json"):
                shutil.copy2(HERE / "results" / f"{stem}.{ext}", out / f"{stem}.{ext}")
        shutil.copy2(HERE / "RESULTS.md", out / "RESULTS.md")
    if args.archive is not None:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(c.out, arcname="gpu-check")
    failed = [s.name for s in steps if s.status == "FAIL"]
    print(
        f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed or skipped with a reason'}",
        flush=True,
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the steps; write the summary; exit 1 when a step failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (default) or cpu: the dry run")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="results folder")
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds for everything (default 450 on CUDA, 900 for the dry run)"
    )
    ap.add_argument("--archive", type=Path, default=None, help="also pack the results folder into this .tar.gz")
    ap.add_argument("--only", nargs="*", choices=list(LIMITS), default=None, help="run only these steps")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    budget = args.budget if args.budget is not None else (450.0 if cuda else 900.0)
    c = Check(args.out.resolve(), cuda, budget, start=STARTED if argv is None else None)
    slow = 1.0 if cuda else 2.0  # the dry run's limits: 2 CPU cores do the GPU's work, made small
    print(f"gpu-check: {'CUDA' if c.cuda else 'dry run on the CPU'} on {machine()}; results in {c.out}", flush=True)
    missing = _missing(REQUIRED)
    if missing:  # nothing of harden imports: say what to install instead of a traceback
        why = f"harden's dependencies are missing from {sys.executable}: {', '.join(missing)}"
        steps = [Step("environment", "FAIL", 0.0, why, {"missing": missing})]
        steps += [Step(n, "FAIL", 0.0, "not run: harden's dependencies are missing") for n in list(LIMITS)[1:]]
        for step in steps:
            print(f"gpu-check: {step.name:<12} {step.status:<4}    0.0 s  {step.detail}", flush=True)
        return finish(c, args, steps)
    from gpu_env import step_environment
    from gpu_pipeline import step_pipeline

    ddp_share = LIMITS["ddp"] if torch.cuda.device_count() >= 2 else 0

    def limit(name: str) -> float:
        reserve = ddp_share if name == "bench" else 0
        return min(LIMITS[name] * slow, c.remaining() - reserve)

    plan: list[tuple[str, Callable[[], Step]]] = [
        ("environment", lambda: step_environment(c)),
        ("gpu_tests", lambda: step_gpu_tests(c, limit("gpu_tests"))),
        ("pipeline", lambda: step_pipeline(c, limit("pipeline"))),
        ("bench", lambda: step_bench(c, limit("bench"))),
        ("ddp", lambda: step_ddp(c, limit("ddp"))),
    ]
    steps: list[Step] = []
    for name, fn in plan:
        if args.only is None or name in args.only:
            steps.append(timed_step(c, name, fn))
            write_summary(c, steps)
    return finish(c, args, steps)


if __name__ == "__main__":
    raise SystemExit(main())
