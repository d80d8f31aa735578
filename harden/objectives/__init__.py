"""Training objectives: a registry of :class:`Objective` classes mixed by weight in a policy.

Third-party objectives register through the ``harden.objectives`` entry-point group.
"""

from harden.objectives import ce as _ce  # noqa: F401  (registers)
from harden.objectives import gaussian_aug as _gaussian_aug  # noqa: F401  (registers)
from harden.objectives import iwd_at as _iwd_at  # noqa: F401  (registers)
from harden.objectives import jsigr as _jsigr  # noqa: F401  (registers)
from harden.objectives import mi as _mi  # noqa: F401  (registers)
from harden.objectives import ot_metric as _ot_metric  # noqa: F401  (registers)
from harden.objectives import pgd_at as _pgd_at  # noqa: F401  (registers)
from harden.objectives import trades as _trades  # noqa: F401  (registers)
from harden.objectives.base import (
    OBJECTIVES,
    BatchContext,
    Objective,
    ObjectiveParams,
    ObjectiveSet,
    View,
    pgd_view,
)

__all__ = ["OBJECTIVES", "BatchContext", "Objective", "ObjectiveParams", "ObjectiveSet", "View", "pgd_view"]
