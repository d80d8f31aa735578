"""The parts of a certificate and the verdict rule: what :class:`harden.certificate.Certificate` holds.

The records a certificate nests (:class:`SmoothingSummary`, :class:`SaliencyExample`,
:class:`RequirementResult`, :class:`ClassResult`, :class:`BaselineSummary`), the targets of
``certify.require`` recomputed from its numbers (:func:`requirement_results`), and
:func:`verdict_rule`, a pure function of a certificate's own checks and smoothing, so
``harden inspect`` re-applies it to a certificate it reads. ``harden.certificate`` exports them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harden.require import parse_requirement

__all__ = [
    "BaselineSummary",
    "ClassResult",
    "RequirementResult",
    "SaliencyExample",
    "Sha256",
    "SmoothingSummary",
    "requirement_results",
    "requirement_values",
    "verdict_rule",
]

#: a SHA-256 hex digest
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SmoothingSummary(BaseModel):
    """Randomized-smoothing results (Cohen et al. 2019) as stored in the certificate.

    Attributes:
        sigma, n0, n, alpha: CERTIFY's settings.
        examples: examples certified; abstentions: how many the smoothed classifier abstained on.
        radius: the l2 radius the verdict is about (None with an linf threat and no radius set).
        certified_accuracy: certified accuracy at ``radius``.
        min_certified_accuracy: what CERTIFIED requires at ``radius``.
        curve: ``(radius, certified accuracy)`` pairs.
        labels, predictions, radii: per example (prediction -1 = abstain).
        seconds: wall time; samples_per_second: noisy forward passes per second.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma: float
    n0: int
    n: int
    alpha: float
    examples: int
    abstentions: int
    radius: float | None
    certified_accuracy: float | None
    min_certified_accuracy: float
    curve: list[tuple[float, float]]
    labels: list[int]
    predictions: list[int]
    radii: list[float]
    seconds: float
    samples_per_second: float


class SaliencyExample(BaseModel):
    """One test image and its input-gradient saliency maps.

    Maps are ``|d CE / dx|``, max over channels, scaled to [0, 1], for the hardened model and,
    when given, a plainly trained baseline.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: int
    prediction: int
    image: list[list[list[float]]]
    maps: dict[str, list[list[float]]]


class RequirementResult(BaseModel):
    """One target of ``certify.require`` and how the certificate's numbers meet it.

    Attributes:
        text: the canonical form (``robust_accuracy >= 45%``); metric, op, value: its parts
            (``value`` a fraction).
        actual: the measured value (None: the certificate did not measure the metric, a FAIL).
        passed: the target is met.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    metric: str
    op: Literal[">=", ">", "<=", "<"]
    value: float = Field(ge=0, le=1)
    actual: float | None = None
    passed: bool


class ClassResult(BaseModel):
    """Clean and robust counts of one class on the verified examples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: int
    name: str | None = None
    n: int = Field(ge=0)
    clean: int = Field(ge=0)
    robust: int = Field(ge=0)


class BaselineSummary(BaseModel):
    """The undefended baseline model, verified by the same suite on the same examples (checks off).

    Attributes:
        n, clean_accuracy, robust_accuracy, per_attack, intervals: as the certificate's own.
        eps_curve, eps_intervals: its accuracy against eps and the 95% Wilson intervals (on ``check_n``).
        check_n: examples of the eps curve; weights_sha256: of its weights, when known.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(ge=1)
    clean_accuracy: float = Field(ge=0, le=1)
    robust_accuracy: float = Field(ge=0, le=1)
    per_attack: dict[str, float]
    intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    eps_curve: list[tuple[float, float]] = Field(default_factory=list)
    eps_intervals: list[tuple[float, float]] = Field(default_factory=list)
    check_n: int | None = Field(None, ge=1)
    weights_sha256: Sha256 | None = None


def requirement_values(
    clean_accuracy: float, robust_accuracy: float, per_attack: Mapping[str, float], smoothing: SmoothingSummary | None
) -> dict[str, float | None]:
    """What a requirement may name, from a certificate's numbers (None: not measured).

    Example:
        >>> requirement_values(0.79, 0.04, {"pgd": 0.04}, None)
        {'clean_accuracy': 0.79, 'robust_accuracy': 0.04, 'certified_accuracy': None, 'after:pgd': 0.04}
    """
    out: dict[str, float | None] = {"clean_accuracy": clean_accuracy, "robust_accuracy": robust_accuracy}
    out["certified_accuracy"] = smoothing.certified_accuracy if smoothing is not None else None
    out.update({f"after:{label}": acc for label, acc in per_attack.items()})
    return out


def requirement_results(texts: Iterable[str], values: Mapping[str, float | None]) -> list[RequirementResult]:
    """Each requirement (``METRIC OP VALUE``) against ``values`` (:func:`requirement_values`).

    Raises:
        PolicyError: a text is not a requirement (:func:`harden.require.parse_requirement`).

    Example:
        >>> [(r.text, r.passed) for r in requirement_results(["robust_accuracy >= 0.45"], {"robust_accuracy": 0.04})]
        [('robust_accuracy >= 45%', False)]
    """
    out = []
    for text in texts:
        req = parse_requirement(text)
        actual = req.actual(values)
        out.append(
            RequirementResult(
                text=req.text, metric=req.metric, op=req.op, value=req.value, actual=actual, passed=req.check(values)
            )
        )
    return out


def verdict_rule(checks: Mapping[str, Any], smoothing: SmoothingSummary | None) -> tuple[str, str]:
    """The verdict and its reason from a certificate's own data: its checks by id and its smoothing.

    Any check whose ``status`` is ``FAIL`` makes it UNRELIABLE (a ``SKIP``, a check that tested
    nothing, neither fails nor vouches for anything); else CERTIFIED needs smoothing at an
    l2 radius with certified accuracy reaching ``min_certified_accuracy``; else EMPIRICAL.

    Args:
        checks: the sanity checks by id (each a mapping with ``status``).
        smoothing: randomized-smoothing results, if run.

    Example:
        >>> verdict_rule({}, None)[0], verdict_rule({"x": {"status": "FAIL"}}, None)
        ('EMPIRICAL', ('UNRELIABLE', 'sanity check(s) failed: x'))
        >>> verdict_rule({"y": {"status": "SKIP"}}, None)[1]
        'attack suite only (randomized smoothing not run: certify.smoothing is false); not tested (SKIP, N/A): y'
    """

    def status(c: Any) -> Any:
        return c.get("status") if isinstance(c, Mapping) else None

    failed = [str(cid) for cid, c in checks.items() if status(c) == "FAIL"]
    if failed:
        return "UNRELIABLE", f"sanity check(s) failed: {', '.join(failed)}"
    skipped = [str(cid) for cid, c in checks.items() if status(c) == "SKIP"]
    note = f"; not tested (SKIP, N/A): {', '.join(skipped)}" if skipped else ""
    if smoothing is None:
        return "EMPIRICAL", "attack suite only (randomized smoothing not run: certify.smoothing is false)" + note
    if smoothing.radius is None:
        return "EMPIRICAL", "smoothing certifies l2 radii; the threat is linf and certify.radius is not set" + note
    acc = smoothing.certified_accuracy or 0.0
    if acc >= smoothing.min_certified_accuracy:
        return "CERTIFIED", (
            f"smoothed classifier (sigma={smoothing.sigma:g}) certified on {acc:.1%} of {smoothing.examples} "
            f"examples at l2 radius {smoothing.radius:g} (alpha={smoothing.alpha:g})" + note
        )
    return "EMPIRICAL", (
        f"certified accuracy {acc:.1%} at l2 radius {smoothing.radius:g} is below the required "
        f"{smoothing.min_certified_accuracy:.0%}" + note
    )
