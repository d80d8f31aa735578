"""``harden.plan``: what a run will do, before it does it, and about how long it will take.

:func:`make_plan` reads a policy and the size of its data and counts the work of every stage:
the training steps and the forward-backward passes each step costs (from the objectives and the
views they attack), the probe, the attacks of the suite with their steps and restarts, the
sanity checks, the eps sweep, randomized smoothing and the attack on the exported ONNX session.
With ``seconds_per_pass`` (one forward-backward pass of one training batch, measured by
:func:`measure_pass_seconds` in about a second) it multiplies the counts into an estimate of the
time. :meth:`Plan.lines` is what ``harden run`` prints before training.

The counts are exact where the policy fixes them (epochs, batches, PGD steps) and upper bounds
or approximations elsewhere: the attack cascade only attacks the examples earlier attacks did
not break, query attacks cost forwards (counted as a third of a pass each), and the time of a
pass on an evaluation batch is taken proportional to its size. The lines say "about" where the
number is approximate, and the time is always called an estimate.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks import ATTACKS
from harden.attacks.suite import preset_specs
from harden.check_context import sweep_radii
from harden.models import model_device
from harden.objectives import OBJECTIVES
from harden.policy import Policy
from harden.policy_io import checked

__all__ = ["Plan", "make_plan", "measure_pass_seconds"]

#: forward-backward passes of an objective's loss, beyond the attack steps of its views
_LOSS_PASSES: dict[str, int] = {"ce": 1, "gaussian_aug": 1, "pgd_at": 1, "trades": 2, "mi": 2, "ot_metric": 2}
#: objectives whose count is exact (the others are "about")
_EXACT = frozenset({"ce", "gaussian_aug", "pgd_at"})
#: a forward alone costs about a third of a forward-backward pass
_FORWARD = 1 / 3
#: PGD runs of the sanity checks in units of ``check_steps`` (an upper bound: each runs only on the
#: examples still right): the suite's outcome continued, and one more random start
_CHECK_RUNS = 2
#: runs of ``sweep_steps`` the checks add to the eps sweep: the large-eps and unbounded radii
_LARGE_RUNS = 2


@dataclass(frozen=True)
class Plan:
    """The work of one run, stage by stage (see the module).

    Attributes:
        epochs: training epochs.
        batches_per_epoch: training steps per epoch.
        batch_size: training batch size.
        passes_per_step: forward-backward passes of one training batch per step.
        exact: whether ``passes_per_step`` is exact (else approximate).
        passes: per stage (``train``, ``probe``, ``verify``, ``checks``, ``smoothing``, ``onnx``),
            forward-backward passes counted in training batches (at most, for the attacks).
        seconds_per_pass: the measured time of one pass (None: no estimate).
        text: the human lines of each stage, in order.
    """

    epochs: int
    batches_per_epoch: int
    batch_size: int
    passes_per_step: float
    exact: bool
    passes: dict[str, float]
    seconds_per_pass: float | None = None
    text: list[str] = field(default_factory=list)

    def seconds(self) -> dict[str, float] | None:
        """Estimated seconds per stage (None when no pass was measured)."""
        if self.seconds_per_pass is None:
            return None
        return {k: v * self.seconds_per_pass for k, v in self.passes.items()}

    def lines(self) -> list[str]:
        """What the run will do, one line each, and the time estimate when known."""
        out = list(self.text)
        secs = self.seconds()
        if secs is not None:
            parts = ", ".join(f"{k} {_duration(v)}" for k, v in secs.items() if v >= 0.05)
            out.append(
                f"time      about {_duration(sum(secs.values()))} (an estimate: {parts}; from "
                f"{self.seconds_per_pass:.3g} s per forward-backward pass of a batch of {self.batch_size}, measured)"
            )
        return out


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _objective_passes(policy: Policy) -> tuple[float, bool, list[str]]:
    """(passes per step, exact, one description per objective) of the policy's weighted objectives."""
    views: dict[Any, int] = {}  # a view shared by objectives is computed once per batch
    loss, exact, names = 0.0, True, []
    specs = [s for s in policy.objectives if s.weight > 0]  # weight 0 is not trained (harden.fit)
    for spec in specs:
        obj = OBJECTIVES.get(spec.name)(spec.params_for_build(), policy.threat)
        own = obj.views()
        for view in own:
            views[view] = min(views.get(view, spec.every), spec.every)
        params = dict(spec.params)
        steps = [int(dict(v.params).get("steps", 1)) for v in own]
        if not own and isinstance(params.get("steps"), int):  # an attack of its own (iwd_at)
            steps, exact = [params["steps"]], False
            loss += params["steps"] / spec.every
        extra = _LOSS_PASSES.get(spec.name)
        if extra is None:
            extra, exact = 2 + int(params.get("nproj", 0)), False  # clean + perturbed forwards (+ projections)
        exact = exact and spec.name in _EXACT and len(specs) == 1
        loss += extra / spec.every
        every = f", every {spec.every} steps" if spec.every > 1 else ""
        names.append(
            f"{spec.name}*{spec.weight:g}" + (f" (steps {', '.join(map(str, steps))}{every})" if steps else every)
        )
    attack = sum(int(dict(v.params).get("steps", 1)) / every for v, every in views.items())
    return loss + attack, exact, names


def _attack_cost(name: str, params: dict[str, Any], num_classes: int) -> tuple[float, str]:
    """(forward-backward passes per example, a short description) of one attack of the suite."""
    restarts = int(params.get("restarts", 1))
    eot = int(params.get("eot", 1))
    if "n_queries" in params:
        return params["n_queries"] * restarts * _FORWARD, f"{params['n_queries']} queries"
    if "samples" in params:
        return params["samples"] * _FORWARD, f"{params['samples']} draws"
    if "angles" in params:
        grid = params["angles"] * params.get("shifts", 1) ** 2
        return grid * _FORWARD, f"{grid} transforms"
    steps = int(params.get("steps", 1))
    targets = min(int(params.get("n_target_classes", 1)), max(num_classes - 1, 1))
    what = (f"steps {steps}" if "steps" in params else "1 step") + (f", restarts {restarts}" if restarts > 1 else "")
    what += f", eot {eot}" if eot > 1 else ""
    what += f", {targets} targets" if targets > 1 else ""
    screen = params.get("screen_steps")
    if isinstance(screen, int) and screen < steps:  # every target screened, the best ones run in full
        full = min(int(params.get("full_targets", 1)), targets)
        what += f" screened with {screen} steps, {full} in full"
        return float((targets * screen + full * restarts * steps) * eot), what
    return float(steps * restarts * eot * targets), what


def _in_cascade(name: str) -> bool:
    """Whether the attack ``name`` joins the l_p cascade (bounded, label-preserving), as :func:`harden.attacks.suite.order_attacks` decides."""
    cls = ATTACKS.get(name)
    return bool(cls.bounded and not cls.changes_label)


def _verify_lines(policy: Policy, n_test: int, num_classes: int) -> tuple[list[str], float, float]:
    """(lines, attack passes, check passes) of the verification stage, in example passes."""
    spec = policy.verify
    n = min(spec.n_examples, n_test)
    attacks, passes = [], 0.0
    for a in [*preset_specs(spec.preset), *spec.attacks]:
        m = min(a.n_examples or n, n)
        cost, what = _attack_cost(a.name, dict(a.params), num_classes)
        passes += m * cost
        attacks.append(f"{a.name} ({what}{'' if m == n else f', n={m}'})")
    lines = [f"verify    {n} test examples ({spec.sample}); attacks: {', '.join(attacks) or 'none'}"]
    checks = 0.0
    k = min(spec.check_examples, n_test)
    radii = sweep_radii(spec.eps_sweep, policy.threat)
    eps = policy.threat.eps
    # the suite's own outcome is the run at the threat's eps; without an l_p attack it is a PGD run too
    own = 0 if any(_in_cascade(a.name) for a in [*preset_specs(spec.preset), *spec.attacks]) else 1
    sweep_runs = len([e for e in radii if e != eps]) + (own if eps in radii else 0)
    base_run = 0 if eps in radii else own  # more_iterations_never_help's base when the sweep has no eps
    sweep = ", ".join(f"{e:.4g}" for e in radii) if radii else "none"
    if spec.checks:
        checks = k * (spec.check_steps * _CHECK_RUNS + spec.sweep_steps * (sweep_runs + base_run + _LARGE_RUNS))
        what = f"checks on ({k} examples, PGD-{spec.check_steps}); eps sweep {sweep} (PGD-{spec.sweep_steps})"
    else:
        checks = k * spec.sweep_steps * sweep_runs if radii else 0.0
        what = f"checks off; eps sweep {sweep} (PGD-{spec.sweep_steps}, {k} examples)" if radii else "checks off"
    lines.append(f"          {what}")
    return lines, passes, checks


def make_plan(
    policy: Policy,
    *,
    n_train: int,
    n_test: int,
    image_shape: Sequence[int],
    num_classes: int,
    seconds_per_pass: float | None = None,
) -> Plan:
    """Count the work of a run of ``policy`` on data of this size (see the module).

    Args:
        policy: the policy (checked first).
        n_train: training examples (after ``train_limit``).
        n_test: test examples (after ``test_limit``).
        image_shape: ``(C, H, W)``.
        num_classes: classes of the task.
        seconds_per_pass: one forward-backward pass of one training batch (see
            :func:`measure_pass_seconds`); None: no time estimate.

    Returns:
        A :class:`Plan`.

    Example:
        >>> from harden.testing import tiny_policy
        >>> policy = tiny_policy(objectives=[{"name": "pgd_at", "params": {"steps": 5}}], train={"epochs": 2})
        >>> plan = make_plan(policy, n_train=384, n_test=192, image_shape=(1, 8, 8), num_classes=3)
        >>> plan.batches_per_epoch, plan.passes_per_step, plan.exact
        (6, 6.0, True)
        >>> plan.lines()[1]
        'train     2 epochs x 6 batches of 64; objectives: pgd_at*1 (steps 5) -> 6 forward-backward passes per step'
    """
    policy = checked(policy)
    bs = policy.data.batch_size
    batches = max(math.ceil(n_train / bs), 1)
    per_step, exact, objs = _objective_passes(policy)
    t = policy.train
    about = "" if exact else "about "
    shape = "x".join(map(str, image_shape))
    text = [
        f"plan      policy {policy.name!r} on {policy.device}: {n_train} train / {n_test} test images "
        f"({shape}, {num_classes} classes)",
        f"train     {t.epochs} epochs x {batches} batches of {bs}; objectives: {', '.join(objs)} -> "
        f"{about}{per_step:g} forward-backward pass{'' if per_step == 1 else 'es'} per step",
    ]
    probe = min(t.probe_examples, n_test)
    text.append(f"          each epoch: clean accuracy on {n_test} test images, PGD-{t.probe_steps} probe on {probe}")
    vlines, attack_passes, check_passes = _verify_lines(policy, n_test, num_classes)
    text += vlines
    c = policy.certify
    smooth = min(c.n_examples, n_test) * c.n * _FORWARD if c.smoothing else 0.0
    text.append(
        f"certify   smoothing: {c.n} noise draws (sigma {c.sigma:g}) on {min(c.n_examples, n_test)} examples"
        if c.smoothing
        else "certify   smoothing off"
    )
    e = policy.export
    onnx = 0.0
    if e.verify_examples:
        m = min(e.verify_examples, n_test)
        onnx = m * (1000 + 10 + 20) * _FORWARD  # Square 1000 queries, noise 10 draws, transfer 20 steps (defaults)
        text.append(f"export    ONNX with parity on {e.parity_examples} images; its session attacked on {m} examples")
    else:
        text.append(f"export    ONNX with parity on {e.parity_examples} images; its session not attacked")
    epoch_eval = t.epochs * (probe * (t.probe_steps + 1) + n_test * _FORWARD)
    passes = {
        "train": t.epochs * batches * per_step,
        "probe": epoch_eval / bs,
        "verify": (attack_passes + n_test * _FORWARD) / bs,
        "checks": check_passes / bs,
        "smoothing": smooth / bs,
        "onnx": onnx / bs,
    }
    return Plan(t.epochs, batches, bs, per_step, exact, passes, seconds_per_pass, text)


def measure_pass_seconds(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], *, repeats: int = 2) -> float:
    """Seconds of one training forward-backward pass of ``model`` on ``batch``: one warm-up, ``repeats`` timed.

    Runs on a copy of the model (its weights, BatchNorm statistics and gradients stay as they
    were) on the model's device, inside ``torch.random.fork_rng`` (the caller's RNG is untouched).

    Example:
        >>> from harden.testing import TinyCNN
        >>> seconds = measure_pass_seconds(TinyCNN(num_classes=3), (torch.rand(8, 1, 8, 8), torch.arange(8) % 3))
        >>> 0 < seconds < 10
        True
    """
    net = copy.deepcopy(model).train()
    device = model_device(net)
    x, y = batch[0].to(device, torch.float32), batch[1].to(device, torch.int64)

    def once() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        once()
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        return (time.perf_counter() - t0) / repeats
