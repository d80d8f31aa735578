"""``harden.require``: targets a certificate is held to ("robust_accuracy >= 45%"), the CI/CD gate.

A requirement reads ``METRIC OP VALUE``:

- ``METRIC``: ``clean_accuracy``, ``robust_accuracy`` (worst case over the attack suite),
  ``certified_accuracy`` (randomized smoothing at the certificate's l2 radius) or
  ``after:<attack label>`` (the accuracy after that attack of the cascade, e.g. ``after:apgd_ce``;
  ``accuracy_after:<label>`` is read the same);
- ``OP``: ``>=``, ``>``, ``<=`` or ``<``;
- ``VALUE``: a fraction in [0, 1] (``0.45``) or a percentage (``45%``).

``certify.require`` in a policy lists them (each checked when the policy loads), the certificate
records each one's result at the top, and ``harden inspect --require`` adds more: a requirement
whose metric the certificate did not measure fails. This module imports nothing of harden but
its errors.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from harden.errors import PolicyError

__all__ = ["METRICS", "OPERATORS", "Requirement", "format_fraction", "parse_requirement"]

#: the metrics a requirement may name (besides ``after:<attack label>``)
METRICS = ("clean_accuracy", "robust_accuracy", "certified_accuracy")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_FORM = re.compile(r"\s*(?P<metric>[^\s<>=]+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>\S+)\s*")
_AFTER = ("after:", "accuracy_after:")
_MAX_TEXT = 200


def format_fraction(value: float) -> str:
    """A fraction as a short percentage: ``0.45`` -> ``45%``, ``0.455`` -> ``45.5%``.

    Example:
        >>> format_fraction(0.45), format_fraction(0.455), format_fraction(1.0)
        ('45%', '45.5%', '100%')
    """
    return f"{100 * value:.10g}%"


@dataclass(frozen=True)
class Requirement:
    """One target: ``metric op value`` (``value`` a fraction in [0, 1]).

    Attributes:
        metric: ``clean_accuracy``, ``robust_accuracy``, ``certified_accuracy`` or ``after:<label>``.
        op: ``>=``, ``>``, ``<=`` or ``<``.
        value: the threshold, a fraction in [0, 1].
    """

    metric: str
    op: str
    value: float

    @property
    def text(self) -> str:
        """The canonical form, e.g. ``robust_accuracy >= 45%``."""
        return f"{self.metric} {self.op} {format_fraction(self.value)}"

    def actual(self, values: Mapping[str, float | None]) -> float | None:
        """The measured value of the metric in ``values`` (None: not measured)."""
        got = values.get(self.metric)
        return None if got is None or not math.isfinite(got) else float(got)

    def check(self, values: Mapping[str, float | None]) -> bool:
        """True when the metric was measured and meets the target; a metric not measured fails.

        Example:
            >>> r = parse_requirement("robust_accuracy >= 45%")
            >>> r.check({"robust_accuracy": 0.04}), r.check({"robust_accuracy": 0.45}), r.check({})
            (False, True, False)
        """
        got = self.actual(values)
        return got is not None and OPERATORS[self.op](got, self.value)


def _metric(text: str, whole: str) -> str:
    for prefix in _AFTER:
        if text.startswith(prefix):
            label = text[len(prefix) :]
            if not label:
                raise PolicyError(f"expected an attack label after {prefix!r} (e.g. after:pgd), got {whole!r}")
            return "after:" + label
    if text not in METRICS:
        raise PolicyError(
            f"expected a metric among {', '.join(METRICS)} or after:<attack label>, got {text!r} in {whole!r}"
        )
    return text


def _value(text: str, whole: str) -> float:
    pct = text.endswith("%")
    try:
        number = float(text[:-1] if pct else text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PolicyError(f"expected a number (0.45) or a percentage (45%) as the value, got {text!r} in {whole!r}")
    value = number / 100 if pct else number
    if not 0 <= value <= 1:
        hint = f" (write {text}% for a percentage)" if not pct and 1 < number <= 100 else ""
        raise PolicyError(f"expected a value in [0, 1] or [0%, 100%], got {text!r} in {whole!r}{hint}")
    return value


def parse_requirement(text: str) -> Requirement:
    """Read ``METRIC OP VALUE`` (see the module docs).

    Args:
        text: e.g. ``"robust_accuracy >= 0.45"``, ``"clean_accuracy>90%"``, ``"after:pgd >= 50%"``.

    Returns:
        The :class:`Requirement`.

    Raises:
        PolicyError: one line, "expected ..., got ...", naming the part that is wrong.

    Example:
        >>> parse_requirement("robust_accuracy >= 0.45")
        Requirement(metric='robust_accuracy', op='>=', value=0.45)
        >>> parse_requirement("after:apgd_ce>50%").text
        'after:apgd_ce > 50%'
        >>> parse_requirement("robust_accuracy >= 45")
        Traceback (most recent call last):
        ...
        harden.errors.PolicyError: expected a value in [0, 1] or [0%, 100%], got '45' in 'robust_accuracy >= 45' (write 45% for a percentage)
    """
    if not isinstance(text, str):
        raise PolicyError(f"expected a requirement as text (e.g. 'robust_accuracy >= 0.45'), got {type(text).__name__}")
    shown = text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."
    m = _FORM.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if m is None:
        raise PolicyError(
            f"expected 'METRIC OP VALUE' with OP one of >=, >, <=, < (e.g. 'robust_accuracy >= 0.45'), got {shown!r}"
        )
    return Requirement(_metric(m["metric"], text), m["op"], _value(m["value"], text))
