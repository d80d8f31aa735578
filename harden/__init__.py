"""harden: harden image classifiers against adversarial examples.

The public names are imported lazily (PEP 562): ``import harden`` is cheap, and
``harden.run`` (or ``from harden import run``) imports torch and the pipeline on first use, so
``harden --version`` and ``harden --help`` answer at once.

Example:
    >>> import harden
    >>> result = harden.run("policies/mnist-pgd.yaml", "runs/demo")  # doctest: +SKIP
    >>> result.certificate.verdict  # doctest: +SKIP
    'EMPIRICAL'
    >>> harden.PolicyError.__module__
    'harden.errors'

"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from harden._version import __version__

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from harden.attack_api import attack
    from harden.attacks import ATTACKS, Attack
    from harden.certificate import Certificate
    from harden.certify import certify
    from harden.errors import (
        CheckpointError,
        DataError,
        ExportError,
        HardenError,
        InputError,
        IntegrityError,
        ModelError,
        PolicyError,
        RunFolderError,
        ThreatModelError,
        UnknownNameError,
    )
    from harden.evaluate import EvaluateResult, evaluate
    from harden.export import ExportResult, export_onnx
    from harden.hardening import HardeningLoss
    from harden.model_load import build_model
    from harden.models import Normalized
    from harden.objectives import OBJECTIVES, Objective
    from harden.pipeline import RunResult, run
    from harden.policy import Policy, ThreatModel
    from harden.policy_io import dump_policy, load_policy, policy_hash, validate_policy
    from harden.robustness import RobustnessReport
    from harden.runtime import OnnxClassifier, OnnxModule, load_onnx
    from harden.train import FitResult, fit
    from harden.verify import verify
    from harden.verify_onnx import OnnxReport, verify_onnx

#: public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "ATTACKS": "harden.attacks",
    "Attack": "harden.attacks",
    "Certificate": "harden.certificate",
    "certify": "harden.certify",
    "EvaluateResult": "harden.evaluate",
    "evaluate": "harden.evaluate",
    "ExportResult": "harden.export",
    "export_onnx": "harden.export",
    "HardeningLoss": "harden.hardening",
    "attack": "harden.attack_api",
    "Normalized": "harden.models",
    "build_model": "harden.model_load",
    "OBJECTIVES": "harden.objectives",
    "Objective": "harden.objectives",
    "RunResult": "harden.pipeline",
    "run": "harden.pipeline",
    "Policy": "harden.policy",
    "ThreatModel": "harden.policy",
    "dump_policy": "harden.policy_io",
    "load_policy": "harden.policy_io",
    "policy_hash": "harden.policy_io",
    "validate_policy": "harden.policy_io",
    "OnnxClassifier": "harden.runtime",
    "OnnxModule": "harden.runtime",
    "load_onnx": "harden.runtime",
    "FitResult": "harden.train",
    "fit": "harden.train",
    "RobustnessReport": "harden.robustness",
    "verify": "harden.verify",
    "OnnxReport": "harden.verify_onnx",
    "verify_onnx": "harden.verify_onnx",
    **dict.fromkeys(
        (
            "CheckpointError",
            "DataError",
            "ExportError",
            "HardenError",
            "InputError",
            "IntegrityError",
            "ModelError",
            "PolicyError",
            "RunFolderError",
            "ThreatModelError",
            "UnknownNameError",
        ),
        "harden.errors",
    ),
}

#: submodules whose names are also public names: ``harden.verify`` is the function, not the module
_SHADOWED = frozenset({"certify", "evaluate", "verify", "verify_onnx"})


class _Package(types.ModuleType):
    """harden's module type: importing the submodule ``harden.verify`` keeps ``harden.verify`` the function.

    The import system sets a package's attribute to each submodule it loads; for the four names
    that are both, the public function wins, as it did when this file imported them eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` on first access and cache the name here.

    Raises:
        AttributeError: ``name`` is not a public name of harden (nor a submodule).
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'harden' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ATTACKS",
    "OBJECTIVES",
    "Attack",
    "Certificate",
    "CheckpointError",
    "DataError",
    "EvaluateResult",
    "ExportError",
    "ExportResult",
    "FitResult",
    "HardenError",
    "HardeningLoss",
    "InputError",
    "IntegrityError",
    "ModelError",
    "Normalized",
    "Objective",
    "OnnxClassifier",
    "OnnxModule",
    "OnnxReport",
    "Policy",
    "PolicyError",
    "RobustnessReport",
    "RunFolderError",
    "RunResult",
    "ThreatModel",
    "ThreatModelError",
    "UnknownNameError",
    "__version__",
    "attack",
    "build_model",
    "certify",
    "dump_policy",
    "evaluate",
    "export_onnx",
    "fit",
    "load_onnx",
    "load_policy",
    "policy_hash",
    "run",
    "validate_policy",
    "verify",
    "verify_onnx",
]

sys.modules[__name__].__class__ = _Package
