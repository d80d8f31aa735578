"""What the steps of ``make gpu-check`` share: a step's outcome, and the run's clock, folder and subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GPU_POLICY = ROOT / "policies" / "mnist-gpu.yaml"


@dataclass
class Step:
    """One step's outcome: ``status`` PASS, FAIL or SKIP, with a one-line ``detail``."""

    name: str
    status: str
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


#: a subprocess is not started with less time than this left (it would only time out)
MIN_START = 15.0


class Check:
    """The run: where outputs go, whether CUDA is the target, and the time budget."""

    def __init__(self, out: Path, cuda: bool, budget: float, start: float | None = None) -> None:
        self.out, self.cuda, self.budget = out, cuda, budget
        self.start = time.monotonic() if start is None else start  # the budget counts from here
        self.python = sys.executable
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        """Seconds left of the budget."""
        return self.budget - (time.monotonic() - self.start)

    def call(self, name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run ``cmd`` in the repository root with a time limit; its output goes to ``logs/<name>.log``.

        The command runs in its own process group, so that a time-out kills its children too
        (torchrun's workers, pytest's subprocesses) and no GPU stays held.

        Returns the exit code (124 when the limit was hit, without starting the command when
        less than ``MIN_START`` seconds were given) and the output (stdout and stderr).
        """
        log = self.out / "logs" / f"{name}.log"
        if limit < MIN_START:
            text = f"[gpu-check: not started: {limit:.0f} s left of the budget]"
            with log.open("a") as fh:
                fh.write(f"$ {' '.join(cmd)}\n{text}\n")
            return 124, text
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        try:
            text, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            rc = 124
            text += f"\n[gpu-check: stopped after {limit:.0f} s]\n"
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{text}\n[exit {rc}]\n")
        return rc, text


def tail(text: str, n: int = 1) -> str:
    """The last ``n`` non-empty lines of ``text``, joined with `` | `` and cut to 300 characters."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:300] if lines else "(no output)"
