"""Attacks: a registry of :class:`Attack` classes and the worst-case suite.

Look attacks up by name (``ATTACKS.get("pgd")``); third-party attacks register through the
``harden.attacks`` entry-point group.
"""

from harden.attacks import fgsm as _fgsm  # noqa: F401  (registers)
from harden.attacks import pgd as _pgd  # noqa: F401  (registers)
from harden.attacks.base import ATTACKS, Attack, AttackParams, lp_norm, project
from harden.attacks.suite import SuiteResult, build_attack, run_suite

__all__ = ["ATTACKS", "Attack", "AttackParams", "SuiteResult", "build_attack", "lp_norm", "project", "run_suite"]
