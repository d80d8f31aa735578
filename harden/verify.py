"""``harden.verify``: clean accuracy and per-example worst-case robust accuracy of a suite.

Attacks run as a cascade (each only on the examples still robust); the report gives the
worst case and how many examples survived after each attack, per class too. The examples are a
seeded class-balanced sample of the test split (``verify.sample``); the eps sweep and the
sanity checks run on a smaller class-balanced subset of them (``verify.check_examples``), whose
own clean accuracy the report states beside the headline one. The eps sweep starts from the
suite's own outcome at the threat's eps, each other radius continues a neighbouring one, and the
checks continue its runs (:class:`harden.checks.CheckContext`); the report says where the time went
(:meth:`RobustnessReport.time_split`) and what each check cost.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harden._cascade import CascadeTally, prepared_attacks, run_cascade
from harden.attacks.base import Attack, restore_modes, save_modes
from harden.attacks.suite import preset_specs
from harden.check_context import sweep_radii
from harden.checks import CheckContext, run_checks
from harden.data import DataBundle, EvalData, load_data
from harden.errors import DataError, ModelError
from harden.models import model_device, prepare_model
from harden.policy import Policy
from harden.policy_io import checked
from harden.robustness import SUMMARY_CLASSES, RobustnessReport

__all__ = ["SUMMARY_CLASSES", "RobustnessReport", "verify"]  # the report lives in harden.robustness


def _check_head(logits: int, classes: int | None, needed: int) -> None:
    """A one-line ModelError when the model's head cannot score the data's classes (not a data error)."""
    if classes is not None and logits != classes:
        raise ModelError(
            f"expected the model to output {classes} logits (the data has {classes} classes), got {logits}: "
            "set model.num_classes / the classifier size to the data's classes"
        )
    if logits < needed:
        raise ModelError(
            f"expected the model to output at least {needed} logits (the labels go up to {needed - 1}), got {logits}: "
            "set model.num_classes / the classifier size to the data's classes"
        )


def _eps_curve(ctx: CheckContext, policy: Policy, clean: float, progress: bool) -> list[tuple[float, float]]:
    """Accuracy on the check subset per radius, smallest first; eps 0 is its clean accuracy ``clean``.

    At the threat's eps it is the suite's own worst case on the subset (the cascade's points, not
    attacked again). Above it, each radius continues the one below with PGD: an example fooled at
    a smaller radius stays fooled (its point is inside the larger ball) and only the examples
    still right are attacked, from their point there. Below it, the radii go largest first and
    each attacks with PGD only the examples fooled at the next larger one, from their point
    there; one that no attack fooled in the larger ball counts as right
    (:meth:`harden.checks.CheckContext.attack`). Every figure stays an upper bound of the
    accuracy under attack at its radius, and the curve never rises for a deterministic model.
    The runs are cached in ``ctx``: the checks continue them (the suite's outcome is the base
    run of ``more_iterations_never_help``).
    """
    radii = sweep_radii(policy.verify.eps_sweep, policy.threat)
    if not radii:
        return []
    with tqdm(total=len(radii), desc="eps sweep", disable=not progress, leave=False, unit="eps") as bar:
        started: list[float] = []

        def moved(eps: float) -> None:
            if started:  # the radius before this one is done
                bar.update(1)
            started.append(eps)
            bar.set_postfix_str(f"eps={eps:g}", refresh=False)

        states = ctx.sweep(radii, on_radius=moved)
        bar.update(len(radii) - bar.n)
    return [(0.0, clean), *((e, int(states[e].right.sum()) / len(ctx.y)) for e in radii)]  # whole counts over n


def _check_context(
    net: nn.Module,
    cx: torch.Tensor,
    cy: torch.Tensor,
    num_classes: int,
    tally: CascadeTally,
    lp_attacks: list[Attack],
    policy: Policy,
    history: list[dict[str, Any]] | None,
) -> CheckContext:
    """What the eps sweep and the sanity checks share: the check examples ``(cx, cy)`` and the cascade's outcomes.

    The suite's worst-case inputs of the check examples are the run at the threat's eps.
    """
    labels = list(zip(tally.result.labels, lp_attacks, strict=True))
    return CheckContext(
        net,
        cx,
        cy,
        policy.threat,
        num_classes,
        steps=policy.verify.check_steps,
        sweep_steps=policy.verify.sweep_steps,
        broken_by=tally.result.broken_by,
        white_box=[lb for lb, a in labels if a.white_box],
        history=history or [],
        black_box=[lb for lb, a in labels if not a.white_box],
        indices=tally.indices,
        seed=policy.seed,
        suite_adv=torch.cat(tally.check_adv) if tally.check_adv and lp_attacks else None,  # no l_p attack: PGD
    )


def _class_names(data: EvalData, bundle: DataBundle | None) -> tuple[str, ...] | None:
    """The class names of the bundle, else of the data (a Dataset's or its loader's ``classes``), else None."""
    if bundle is not None:
        return bundle.class_names
    ds = data.dataset if isinstance(data, DataLoader) else data
    names = getattr(ds, "classes", None)
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def verify(
    model: nn.Module,
    policy: Policy,
    data: EvalData | None = None,
    *,
    bundle: DataBundle | None = None,
    history: list[dict[str, Any]] | None = None,
    progress: bool = True,
    keep_adversarial: int = 0,
) -> RobustnessReport:
    """Attack ``model`` with the policy's suite on ``data`` (default: the policy's test split).

    The examples are ``verify.n_examples`` of ``data``: a class-balanced sample seeded by
    ``policy.seed`` (``verify.sample: first``: the first N; ``report.outcomes["indices"]`` says
    which). The l_p attacks run as a cascade (white-box first), each only on the examples still
    robust; attacks outside the l_p threat model run on every example and are reported apart.
    Then the eps sweep and the sanity checks run on a class-balanced subset of
    ``verify.check_examples`` of them (its clean accuracy is ``report.check_clean_accuracy``):
    the sweep's point at the threat's eps is the suite's own worst case on the subset, the radii
    above it continue the one below (an example fooled at a smaller radius stays fooled, only the
    others are attacked again), the radii below it attack only the examples fooled at the next
    larger one, and the checks continue the sweep's runs.
    The model is used on the device it is on (batches follow it) and its train/eval modes are
    restored. Attacks are seeded with ``policy.seed`` without touching the global RNG.

    Args:
        model: a classifier taking [0, 1] pixels (wrapped with the policy's mean/std if it is
            not already :class:`harden.models.Normalized`).
        policy: gives the threat model, the attacks and ``verify.n_examples``.
        data: a DataLoader, a Dataset, or an ``(x, y)`` pair of tensors; None: the test split
            of ``bundle`` (or of the policy's data).
        bundle: the policy's data already loaded (:func:`harden.data.load_data`): attacks that
            read the training split (the ``invariance_examples`` pool, the ``transfer``
            surrogate) use its train split. None: the policy's data is loaded if one needs it,
            so a measurement does not depend on who called.
        history: the training history, for the catastrophic-overfitting check.
        progress: show progress bars (the attacks, the eps sweep, the checks).
        keep_adversarial: keep up to this many worst-case adversarial inputs of the l_p suite in
            ``report.adversarial`` (for parity tests of an exported model); 0 keeps none.

    Returns:
        A :class:`RobustnessReport`.

    Raises:
        DataError: no examples, pixels outside [0, 1], or a negative ``keep_adversarial``.

    Example:
        >>> from harden.testing import TinyCNN, tiny_policy, synthetic_tensors
        >>> report = verify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(32), progress=False)
        >>> report.n, report.robust_accuracy <= report.clean_accuracy
        (32, True)
        >>> kept = verify(TinyCNN(num_classes=3), tiny_policy(), synthetic_tensors(32), progress=False, keep_adversarial=4)
        >>> kept.adversarial is None or kept.adversarial.shape[1:] == (1, 8, 8)
        True
    """
    if isinstance(keep_adversarial, bool) or not isinstance(keep_adversarial, int) or keep_adversarial < 0:
        raise DataError(f"expected keep_adversarial as an integer >= 0, got {keep_adversarial!r}")
    t0 = time.perf_counter()
    policy = checked(policy)  # a policy built in Python is checked (and its params filled) as a loaded one is
    net = prepare_model(model, policy.model)
    device = model_device(net)
    if data is None:
        bundle = bundle if bundle is not None else load_data(policy.data)
        data = bundle.test
    specs = [*preset_specs(policy.verify.preset), *policy.verify.attacks]
    lp_attacks, other_attacks, other_caps = prepared_attacks(specs, policy, bundle, device)
    setup = time.perf_counter() - t0
    modes = save_modes(net)
    net.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(policy.seed)
            t1 = time.perf_counter()
            tally = run_cascade(
                net,
                data,
                lp_attacks,
                other_attacks,
                other_caps,
                device,
                batch_size=policy.data.eval_batch_size,
                limit=policy.verify.n_examples,
                desc="verify",
                progress=progress,
                check_examples=policy.verify.check_examples,
                keep_adversarial=keep_adversarial,
                sample=policy.verify.sample,
                seed=policy.seed,
            )
            cascade = time.perf_counter() - t1
            cx, cy = torch.cat(tally.check_x), torch.cat(tally.check_y)
            with torch.no_grad():
                logits = int(net(cx[:1]).shape[1])
            _check_head(logits, bundle.num_classes if bundle is not None else None, int(cy.max()) + 1)
            num_classes = bundle.num_classes if bundle is not None else logits
            fields = tally.report_fields(
                policy, specs, 0.0, num_classes=num_classes, class_names=_class_names(data, bundle)
            )
            ctx = _check_context(net, cx, cy, num_classes, tally, lp_attacks, policy, history)
            t2 = time.perf_counter()
            curve = _eps_curve(ctx, policy, fields["check_clean_accuracy"], progress)
            t3 = time.perf_counter()
            results = run_checks(ctx, progress=progress) if policy.verify.checks else {}
            t4 = time.perf_counter()
    finally:
        restore_modes(net, modes)
    return RobustnessReport(
        **{**fields, "seconds": time.perf_counter() - t0},
        eps_curve=curve,
        checks={k: v.to_dict() for k, v in results.items()},
        adversarial=tally.adversarial,
        sweep_seconds=t3 - t2,
        check_seconds=t4 - t3,
        per_check_seconds={k: v.seconds for k, v in results.items()},
        setup_seconds=setup,
        cascade_seconds=cascade,
    )
