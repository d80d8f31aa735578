"""harden: harden image classifiers against adversarial examples.

Example:
    >>> import harden
    >>> result = harden.run("policies/mnist-pgd.yaml", "runs/demo")  # doctest: +SKIP
    >>> result.certificate.verdict  # doctest: +SKIP
    'EMPIRICAL'

"""

from harden._version import __version__
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
from harden.export import ExportResult, export_onnx
from harden.models import Normalized, build_model
from harden.objectives import OBJECTIVES, Objective
from harden.pipeline import RunResult, run
from harden.policy import Policy, ThreatModel
from harden.policy_io import dump_policy, load_policy, policy_hash, validate_policy
from harden.runtime import OnnxClassifier, OnnxModule, load_onnx
from harden.train import FitResult, fit
from harden.verify import RobustnessReport, verify
from harden.verify_onnx import OnnxReport, verify_onnx

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
    "build_model",
    "certify",
    "dump_policy",
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
