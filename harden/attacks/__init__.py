"""Attacks: a registry of :class:`Attack` classes and the worst-case suite.

Look attacks up by name (``ATTACKS.get("pgd")``); third-party attacks register through the
``harden.attacks`` entry-point group.
"""

from harden.attacks import apgd as _apgd  # noqa: F401  (registers)
from harden.attacks import apgd_t as _apgd_t  # noqa: F401  (registers)
from harden.attacks import fab as _fab  # noqa: F401  (registers)
from harden.attacks import fgsm as _fgsm  # noqa: F401  (registers)
from harden.attacks import invariance as _invariance  # noqa: F401  (registers)
from harden.attacks import invariance_examples as _invariance_examples  # noqa: F401  (registers)
from harden.attacks import iwd as _iwd  # noqa: F401  (registers)
from harden.attacks import noise as _noise  # noqa: F401  (registers)
from harden.attacks import pgd as _pgd  # noqa: F401  (registers)
from harden.attacks import square as _square  # noqa: F401  (registers)
from harden.attacks import transfer as _transfer  # noqa: F401  (registers)
from harden.attacks.base import ATTACKS, Attack, AttackEnv, AttackParams, lp_norm, project
from harden.attacks.suite import SuiteResult, build_attack, preset_specs, run_suite

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackEnv",
    "AttackParams",
    "SuiteResult",
    "build_attack",
    "lp_norm",
    "preset_specs",
    "project",
    "run_suite",
]
