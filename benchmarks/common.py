"""Shared helpers of the benchmark scripts: machine description, result files, small models.

Every script writes ``benchmarks/results/<name>.md`` (and ``.json``); ``report.py`` assembles
them into ``benchmarks/RESULTS.md`` under a header naming the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: environment variable naming the `make bench` run a section belongs to
RUN_ENV = "HARDEN_BENCH_RUN"


def machine() -> str:
    """CPU model, cores, memory and GPU (if any), in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores (torch threads {threads}), {gpu}, torch {torch.__version__}"


def commit() -> str:
    """The git commit the benchmark ran on (with '+dirty' for uncommitted changes)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
        dirty = subprocess.run(
            # results being rewritten by this very run do not make the code dirty
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)benchmarks/results",
                ":(top,exclude)benchmarks/RESULTS.md",
            ],
            capture_output=True,
            text=True,
            cwd=HERE,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def timed(fn: Callable[[], Any], sync: torch.device | None = None) -> tuple[Any, float]:
    """Run ``fn`` and return (its result, wall seconds), synchronising CUDA if used."""
    if sync is not None and sync.type == "cuda":
        torch.cuda.synchronize(sync)
    t0 = time.perf_counter()
    out = fn()
    if sync is not None and sync.type == "cuda":
        torch.cuda.synchronize(sync)
    return out, time.perf_counter() - t0


def headline(what: str, measured: str, reference: str, ratio: str, note: str = "") -> dict[str, str]:
    """One row of RESULTS.md's summary table: a measurement beside its reference and their ratio."""
    return {"what": what, "measured": measured, "reference": reference, "ratio": ratio, "note": note}


def write_section(
    name: str,
    title: str,
    command: str,
    lines: list[str],
    data: dict[str, Any],
    results: Path | None = None,
    *,
    headlines: list[dict[str, str]] | None = None,
) -> Path:
    """Write ``results/<name>.md`` and ``results/<name>.json`` (``results`` default: benchmarks/results).

    ``headlines`` (rows made by :func:`headline`) go into RESULTS.md's summary table. The JSON
    records the run id from the ``HARDEN_BENCH_RUN`` environment variable (set by ``make bench``)
    so ``report.py`` can tell the sections of this run from those kept from earlier runs.
    """
    out = RESULTS if results is None else Path(results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"## {title}",
        "",
        f"Measured {stamp} on: {machine()}; commit {commit()}.",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    path = out / f"{name}.md"
    path.write_text("\n".join(head + lines) + "\n")
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "date": stamp,
                "command": command,
                "run": os.environ.get(RUN_ENV, ""),
                "headlines": headlines or [],
                **data,
            },
            indent=1,
        )
    )
    return path


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def section_name(base: str, size: str, device: str, *suffixes: str) -> str:
    """The results file stem: ``base``, ``-<size>`` unless small, ``-<device>`` unless cpu, then ``suffixes``.

    Runs with overrides add a suffix (``n50``, ``custom``, ...) so they never overwrite a standard
    section: ``report.py`` expects exactly the standard names.
    """
    parts = [base]
    parts += [size] if size != "small" else []
    parts += [device.replace(":", "")] if device != "cpu" else []
    parts += [s for s in suffixes if s]
    return "-".join(parts)


def base_parser(
    doc: str | None, sizes: dict[str, Any], device_help: str, device_choices: list[str] | None = None
) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--size`` (default ``small``), ``--device``, ``--results``.

    ``doc`` (the script's docstring, with its sizes and times) is the ``--help`` text.
    """
    if "small" not in sizes:
        raise ValueError(f"expected a 'small' size (make bench's default), got {sorted(sizes)}")
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(sizes), default="small", help="see the description above")
    ap.add_argument("--device", choices=device_choices, default="cpu", help=device_help)
    ap.add_argument("--results", type=Path, default=None, help="results directory (default benchmarks/results)")
    return ap


# ---------------------------------------------------------------------------------------------
# A PGD-trained MNIST model from elsewhere (benchmarks/attacks.py verifies a model harden did not
# train, as a user's would be): the MNIST challenge CNN of Madry et al. (two 5x5 convolutions of 32
# and 64 channels, each followed by 2x2 max-pooling, a 1,024-unit layer, 10 logits), adversarially
# trained by a plain PyTorch loop with PGD-10 (step eps/4, random start) at linf eps 0.3 on the
# mnist-5k training split, eps ramped up over the first 4 epochs, Adam at 1e-3, batches of 64,
# seed 0. Nothing of harden's training code runs.
ELSEWHERE_EPS = 0.3


def madry_cnn() -> nn.Sequential:
    """The MNIST challenge CNN (Madry et al. 2018), for 1x28x28 inputs in [0, 1]."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10) -> torch.Tensor:
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
        delta = (delta.detach() + 0.25 * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def train_elsewhere(x: torch.Tensor, y: torch.Tensor, epochs: int, device: torch.device) -> nn.Module:
    """PGD adversarial training of :func:`madry_cnn` on ``(x, y)`` by a hand-written loop; returns it in eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = madry_cnn().to(device)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for epoch in range(epochs):
            eps = min(ELSEWHERE_EPS, ELSEWHERE_EPS * (epoch + 1) / 4)
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                xb, yb = x[order[i : i + 64]].to(device), y[order[i : i + 64]].to(device)
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                adv = _pgd(model, xb, yb, eps)
                for p in model.parameters():
                    p.requires_grad_(True)
                model.train()
                opt.zero_grad()
                F.cross_entropy(model(adv), yb).backward()
                opt.step()
    return model.eval()
