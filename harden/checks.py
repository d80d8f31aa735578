"""Evaluation sanity checks: is the robustness we measured real, or are gradients lying?

After Carlini et al. 2019 ("On evaluating adversarial robustness"), Athalye et al. 2018
("Obfuscated gradients give a false sense of security") and AutoAttack's own checks. Each check
has an id, the condition under which it is raised, and a remedy; it reports PASS, WARN, FAIL or
SKIP with a detail. A FAIL marks the certificate UNRELIABLE. A check that had nothing to test
(no training history, no black-box attack in the suite, no example the model gets right) says
SKIP and why: it never counts as a pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harden.attacks.base import restore_modes, save_modes
from harden.check_context import AttackState, CheckContext
from harden.policy import ThreatModel

__all__ = [
    "CHECKS",
    "AttackState",
    "CheckContext",
    "CheckResult",
    "CheckSpec",
    "Status",
    "onnx_black_box_check",
    "run_checks",
]

#: A check's outcome: SKIP means it had nothing to test (the detail says why); it is not a pass.
Status = Literal["PASS", "WARN", "FAIL", "SKIP"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check; ``seconds`` is its wall time (the attacks it ran included)."""

    id: str
    status: Status
    detail: str
    raised_if: str
    remedy: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, str]:
        """The JSON-able record of the check (its texts; ``seconds`` is reported apart).

        Example:
            >>> sorted(CheckResult("a", "PASS", "fine", "never", "none", seconds=0.5).to_dict())
            ['detail', 'id', 'raised_if', 'remedy', 'status']
        """
        return {k: v for k, v in asdict(self).items() if k != "seconds"}


@dataclass(frozen=True)
class CheckSpec:
    """A registered check: its id, when it is raised, the remedy, and the function."""

    id: str
    raised_if: str
    remedy: str
    fn: Callable[[CheckContext], tuple[Status, str]]


CHECKS: dict[str, CheckSpec] = {}


def _check(id_: str, raised_if: str, remedy: str) -> Callable[[Callable[[CheckContext], tuple[Status, str]]], Any]:
    def deco(fn: Callable[[CheckContext], tuple[Status, str]]) -> Callable[[CheckContext], tuple[Status, str]]:
        if id_ in CHECKS:
            raise ValueError(f"expected a new check id, got {id_!r} twice")
        CHECKS[id_] = CheckSpec(id_, raised_if, remedy, fn)
        return fn

    return deco


def _chance(ctx: CheckContext) -> float:
    counts = torch.bincount(ctx.y.cpu(), minlength=ctx.num_classes).float()
    return float(counts.max() / counts.sum())


@_check(
    "deterministic_eval",
    "the model's eval-mode logits differ between two calls on the same batch, or between a batch and its "
    "examples one at a time (beyond 1e-4)",
    "remove randomness from the eval forward (dropout left on, random transforms) or evaluate with EOT: "
    "params: {eot: 10} on the gradient attacks (pgd, apgd_ce, apgd_t, fgsm) averages each gradient over 10 "
    "forward passes; fix batch-dependent layers (BatchNorm in train mode)",
)
def _deterministic(ctx: CheckContext) -> tuple[Status, str]:
    a = ctx.logits()  # the first call (shared with the other checks), against a second one
    with torch.no_grad():
        b = ctx.model(ctx.x)
        k = min(8, ctx.x.shape[0])
        single = torch.cat([ctx.model(ctx.x[i : i + 1]) for i in range(k)])
    rep = float((a - b).abs().max())
    bat = float((a[:k] - single).abs().max())
    if rep > 1e-4:
        return "FAIL", f"two identical calls differ by {rep:.3g}: the forward pass is random; attack with EOT (eot: 10)"
    if bat > 1e-4:
        return "FAIL", f"batched and one-at-a-time logits differ by {bat:.3g}: outputs depend on the batch"
    return "PASS", f"repeat diff {rep:.1e}, batch vs single diff {bat:.1e}"


@_check(
    "logits_not_probabilities",
    "every output row is non-negative and sums to 1 (the model ends in softmax)",
    "return logits (drop the final softmax); cross-entropy on probabilities saturates and masks gradients",
)
def _logits(ctx: CheckContext) -> tuple[Status, str]:
    out = ctx.logits()
    sums = out.sum(1)
    if bool((out >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        return "FAIL", "outputs are probabilities (non-negative rows summing to 1)"
    return "PASS", f"outputs range [{float(out.min()):.3g}, {float(out.max()):.3g}]"


@_check(
    "input_gradients",
    "the loss gradient w.r.t. the input is NaN/infinite for any example, or zero for more than 5% of them",
    "find the non-differentiable or saturating layer (quantization, argmax, rounding, huge logits) and "
    "evaluate with BPDA or a differentiable surrogate; never rely on gradient-free robustness",
)
def _gradients(ctx: CheckContext) -> tuple[Status, str]:
    modes = save_modes(ctx.model)
    ctx.model.eval()
    try:
        with torch.enable_grad():
            x = ctx.x.clone().requires_grad_(True)
            loss = F.cross_entropy(ctx.model(x), ctx.y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
    finally:
        restore_modes(ctx.model, modes)
    norms = g.flatten(1).norm(dim=1)
    bad = int((~torch.isfinite(norms)).sum())
    zero = float((norms < 1e-12).float().mean())
    if bad:
        return "FAIL", f"{bad} examples have NaN or infinite input gradients"
    if zero > 0.05:
        return "FAIL", f"{zero:.0%} of examples have zero input gradient"
    return "PASS", f"{zero:.1%} zero gradients, median norm {float(norms.median()):.3g}"


def _large_eps(threat: ThreatModel, x: torch.Tensor) -> float:
    """The radius at which the all-0.5 grey image is inside every ball around x."""
    if threat.norm == "linf":
        return 0.5
    return 0.5 * math.sqrt(x[0].numel())


@_check(
    "large_eps_to_chance",
    "PGD accuracy at a radius that contains the uniform grey image (linf 0.5; l2 0.5·sqrt(d)) stays "
    "more than 5 points above chance",
    "the attack is not working: look for gradient masking (see input_gradients) or raise attack steps",
)
def _large_eps_check(ctx: CheckContext) -> tuple[Status, str]:
    eps = _large_eps(ctx.threat, ctx.x)
    chance = _chance(ctx)
    clean = ctx.clean_accuracy()
    if clean <= chance + 0.05:  # the check cannot fail
        return (
            "SKIP",
            f"clean accuracy {clean:.1%} is already within 5 points of chance ({chance:.1%}): nothing to lower",
        )
    acc = ctx.attack(eps).accuracy  # continues a neighbouring radius of the eps sweep (CheckContext.attack)
    status: Status = "PASS" if acc <= chance + 0.05 else "FAIL"
    return status, f"accuracy {acc:.1%} at eps={eps:.3g} (chance {chance:.1%})"


@_check(
    "unbounded_attack_succeeds",
    "PGD with a radius covering the whole input box fools fewer than 99% of the examples",
    "an attack that cannot fool the model with unlimited budget is broken or blocked by masking; check "
    "input_gradients and try black-box attacks (square)",
)
def _unbounded(ctx: CheckContext) -> tuple[Status, str]:
    eps = 1.0 if ctx.threat.norm == "linf" else math.sqrt(ctx.x[0].numel())
    clean = ctx.clean_accuracy()
    if clean <= 0.01:  # the check cannot fail
        return "SKIP", f"clean accuracy {clean:.1%}: the model is right on (almost) no check example, nothing to attack"
    acc = ctx.attack(eps).accuracy  # continues the largest radius attacked below (CheckContext.attack)
    status: Status = "PASS" if acc <= 0.01 else "FAIL"
    return status, f"success {1 - acc:.1%} with eps={eps:.3g}"


@_check(
    "more_iterations_never_help",
    "the base run at the threat's eps (the suite's own worst case on the check subset, else the checks' PGD) "
    "continued by PGD for check_steps more steps from its points, then one PGD run from a fresh random start, "
    "each only on the examples still right (so each can only fool more), leaves more examples correct than the "
    "base run, beyond 1 example (FAIL: the model's answers are random or the gradients inconsistent), or "
    "lowers accuracy by more than 5 points (WARN: the evaluation had not converged)",
    "raise steps/restarts until accuracy stops falling; randomness that favours the model points at a "
    "stochastic defence (use EOT: params: {eot: 10} on pgd / apgd_ce / apgd_t)",
)
def _more_iterations(ctx: CheckContext) -> tuple[Status, str]:
    if ctx.clean_accuracy() == 0.0:
        return "SKIP", "clean accuracy 0%: the model is right on no check example, nothing to attack"
    base = ctx.attack(ctx.threat.eps)  # the suite's outcome on the subset, or the eps sweep's run at eps
    # PGD with step 2.5 eps / steps: the base continued from its points, then a run from a fresh seeded
    # random start on the examples still right. Each figure is a fresh forward pass on the points.
    more = ctx.extend(base)
    restart = ctx.extend(more, restart=1)
    base_acc, more_acc, restart_acc = base.accuracy, more.accuracy, restart.accuracy
    if base.origin == "suite":
        what = "the suite"
    else:
        steps = ctx.sweep_steps or ctx.steps  # the base run is the sweep's run at eps
        what = f"PGD-{steps}" + (f" (continuing eps={base.start:.3g})" if base.start else "")
    detail = f"{what} {base_acc:.1%}, +{ctx.steps} steps {more_acc:.1%}, +1 random restart {restart_acc:.1%}"
    n = ctx.x.shape[0]
    if max(more_acc, restart_acc) > base_acc + 1.5 / n:  # more than one example
        return "FAIL", detail
    if restart_acc < base_acc - 0.05:
        return "WARN", detail
    return "PASS", detail


@_check(
    "white_box_beats_black_box",
    "examples that survive every white-box attack fall to a black-box one (square, transfer, noise): more "
    "than 2% of the evaluated examples FAIL, any WARN",
    "gradients are masked: the white-box figure overstates robustness; report the worst case (harden does) "
    "and find the masking layer",
)
def _white_vs_black(ctx: CheckContext) -> tuple[Status, str]:
    if not ctx.white_box:
        return "SKIP", "no white-box attack in the suite: nothing to compare the black-box attacks with"
    if not ctx.black_box:
        return "SKIP", "no black-box attack in the suite: add square or transfer to verify.attacks to run this check"
    if not ctx.broken_by:
        return "SKIP", "no outcomes of the suite to compare"
    white = set(ctx.white_box)
    reached = sum(1 for b in ctx.broken_by if b not in white and b != "clean")
    if reached == 0:
        return "SKIP", "no example survived the white-box attacks: the black-box attacks ran on none"
    black = [i for i, b in enumerate(ctx.broken_by) if b and b != "clean" and b not in white]
    n = len(ctx.broken_by)
    listed = _listed(black, ctx.indices)
    if len(black) > 0.02 * n:
        return "FAIL", f"{len(black)} of {n} examples fell only to black-box attacks (indices {listed})"
    if black:
        return "WARN", f"{len(black)} of {n} examples fell only to black-box attacks (indices {listed})"
    return "PASS", "no example survived white-box attacks and fell to a black-box one"


@_check(
    "no_catastrophic_overfitting",
    "the per-epoch PGD probe accuracy drops by more than 20 points from its best epoch while clean accuracy "
    "holds (catastrophic overfitting, typical of single-step training)",
    "use more attack steps in training (pgd_at steps >= 2), random starts, or a smaller step size",
)
def _overfitting(ctx: CheckContext) -> tuple[Status, str]:
    probes = [
        (float(h["val_pgd_acc"]), h.get("val_clean_acc")) for h in ctx.history if h.get("val_pgd_acc") is not None
    ]
    if len(probes) < 2:
        got = "no training history" if not ctx.history else f"{len(probes)} epoch(s) with a PGD probe"
        return "SKIP", f"{got}: nothing to compare (harden.verify(..., history=fit_result.history) gives it)"
    best = max(p for p, _ in probes)
    last, clean = probes[-1]
    if best - last > 0.20 and (clean or 0) > 0.5:
        return "FAIL", f"PGD probe fell from {best:.1%} to {last:.1%}"
    return "PASS", f"PGD probe best {best:.1%}, last {last:.1%}"


def run_checks(
    ctx: CheckContext, ids: Sequence[str] | None = None, *, progress: bool = False
) -> dict[str, CheckResult]:
    """Run the checks ``ids`` (default: all) and return their results by id.

    Args:
        ctx: what the checks look at.
        ids: the checks to run, by id (None: every registered check).
        progress: show a progress bar (``checks``), one step per check.

    Example:
        >>> from harden.testing import TinyMLP, synthetic_tensors
        >>> x, y = synthetic_tensors(16)
        >>> ctx = CheckContext(TinyMLP(num_classes=3), x, y, ThreatModel(eps=0.1), num_classes=3, steps=2)
        >>> run_checks(ctx, ["logits_not_probabilities"])["logits_not_probabilities"].status
        'PASS'
    """
    out: dict[str, CheckResult] = {}
    modes = save_modes(ctx.model)
    ctx.model.eval()
    todo = list(ids) if ids is not None else list(CHECKS)
    try:
        with tqdm(total=len(todo), desc="checks", disable=not progress, leave=False, unit="check") as bar:
            for cid in todo:
                bar.set_postfix_str(cid, refresh=False)
                spec, t0 = CHECKS[cid], time.perf_counter()
                status, detail = spec.fn(ctx)
                out[cid] = CheckResult(cid, status, detail, spec.raised_if, spec.remedy, time.perf_counter() - t0)
                bar.update(1)
    finally:
        restore_modes(ctx.model, modes)
    return out


ONNX_RAISED_IF = (
    "examples the PyTorch model held against its whole suite fall on the exported ONNX session to the "
    "gradient-free attacks (or are misclassified there clean): more than 2% of the compared examples FAIL, any WARN"
)
ONNX_REMEDY = (
    "the shipped model is weaker than the certified one: check the export's parity figures, and add the "
    "black-box attacks that broke it (square, transfer) to verify.attacks so the worst case includes them"
)


def _listed(positions: Sequence[int], indices: Sequence[int] | None) -> str:
    """Up to 20 examples by their data index (``indices[position]``; the position where unknown)."""
    named = [indices[i] if indices and i < len(indices) else i for i in positions[:20]]
    return ", ".join(str(i) for i in named) + (" ..." if len(positions) > 20 else "")


def onnx_black_box_check(
    torch_broken_by: Sequence[str], onnx_broken_by: Sequence[str], indices: Sequence[int] | None = None
) -> CheckResult:
    """Compare, example by example, the PyTorch suite's outcomes with the ONNX session's.

    Both lists are per example in data order (``""``: robust, ``"clean"``: wrong when clean, else
    the attack that fooled it); the first ``min(len)`` examples are compared.

    Args:
        torch_broken_by: the PyTorch model's worst-case outcomes (``report.outcomes["broken_by"]``).
        onnx_broken_by: the ONNX session's, under its gradient-free attacks.
        indices: per compared example, its index in the test split (``report.outcomes["indices"]``):
            the examples that fell are named by it; None: by position.

    Example:
        >>> onnx_black_box_check(["", "", "pgd"], ["", "square", "noise"]).status
        'FAIL'
        >>> onnx_black_box_check([""] * 100, ["square"] + [""] * 99).status
        'WARN'
    """
    n = min(len(torch_broken_by), len(onnx_broken_by))
    fell = [i for i in range(n) if torch_broken_by[i] == "" and onnx_broken_by[i] != ""]
    listed = _listed(fell, indices)
    detail = f"{len(fell)} of {n} examples held on the PyTorch model and fell on the ONNX session"
    if n == 0:
        status: Status = "SKIP"
        detail = "no example to compare"
    elif len(fell) > 0.02 * n:
        status, detail = "FAIL", f"{detail} (indices {listed})"
    elif fell:
        status, detail = "WARN", f"{detail} (indices {listed})"
    else:
        status = "PASS"
    return CheckResult("onnx_black_box", status, detail, ONNX_RAISED_IF, ONNX_REMEDY)
