"""Tiny models, data and policies for harden's tests and for users' own tests (one import for all).

The models and :func:`tiny_policy` live in :mod:`harden.tiny`, the contract harnesses in
:mod:`harden.attack_contract` and :mod:`harden.objective_contract`.

:func:`check_attack` and :func:`check_objective` check the contract every attack and objective
keeps; a plugin's own tests call them on its classes. Everything here is seeded, runs in about a
second on a CPU, and needs no download.

Example:
    >>> import harden
    >>> from harden.testing import tiny_policy
    >>> policy = tiny_policy(objectives=[{"name": "ce"}])
    >>> policy.data.name, policy.model.name
    ('synthetic', 'harden.testing:TinyCNN')
"""

from __future__ import annotations

from harden.attack_contract import check_attack
from harden.data import synthetic_bundle, synthetic_tensors
from harden.objective_contract import check_objective
from harden.tiny import ConstantClassifier, QuantizedInput, RowCounter, SoftmaxHead, TinyCNN, TinyMLP, tiny_policy

__all__ = [
    "ConstantClassifier",
    "QuantizedInput",
    "RowCounter",
    "SoftmaxHead",
    "TinyCNN",
    "TinyMLP",
    "check_attack",
    "check_objective",
    "synthetic_bundle",
    "synthetic_tensors",
    "tiny_policy",
]
