"""harden: harden image classifiers against adversarial examples.

Example:
    >>> import harden
    >>> policy = harden.load_policy("policies/mnist-pgd.yaml")  # doctest: +SKIP
    >>> result = harden.fit(None, policy)  # doctest: +SKIP
    >>> report = harden.verify(result.model, policy)  # doctest: +SKIP
"""

from harden.attacks import ATTACKS, Attack
from harden.certify import Certificate, certify
from harden.errors import (
    CheckpointError,
    DataError,
    ExportError,
    HardenError,
    ModelError,
    PolicyError,
    ThreatModelError,
    UnknownNameError,
)
from harden.export import ExportResult, export_onnx
from harden.models import Normalized, build_model
from harden.objectives import OBJECTIVES, Objective
from harden.policy import (
    Policy,
    ThreatModel,
    dump_policy,
    load_policy,
    policy_hash,
    validate_policy,
)
from harden.runtime import OnnxClassifier, OnnxModule, load_onnx
from harden.train import FitResult, fit
from harden.verify import RobustnessReport, verify
from harden.verify_onnx import OnnxReport, verify_onnx

__version__ = "0.1.0"

__all__ = [
    "ATTACKS",
    "OBJECTIVES",
    "Attack",
    "Certificate",
    "CheckpointError",
    "DataError",
    "ExportError",
    "ExportResult",
    "FitResult",
    "HardenError",
    "ModelError",
    "Normalized",
    "Objective",
    "OnnxClassifier",
    "OnnxModule",
    "OnnxReport",
    "Policy",
    "PolicyError",
    "RobustnessReport",
    "ThreatModel",
    "ThreatModelError",
    "UnknownNameError",
    "__version__",
    "build_model",
    "certify",
    "dump_policy",
    "export_onnx",
    "fit",
    "load_onnx",
    "load_policy",
    "policy_hash",
    "validate_policy",
    "verify",
    "verify_onnx",
]
