"""One error hierarchy for harden.

Every error harden raises on purpose derives from :class:`HardenError` and also from the
builtin a caller would catch without knowing harden (``ValueError``, ``KeyError``, ...).
Messages follow the pattern "expected ..., got ..." and, where it helps, end with a remedy.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "ExportError",
    "HardenError",
    "ModelError",
    "PolicyError",
    "ThreatModelError",
    "UnknownNameError",
]


class HardenError(Exception):
    """Root of every error harden raises on purpose."""


class PolicyError(HardenError, ValueError):
    """A policy file or object is invalid.

    The message is one line naming the file (when there is one) and the key path, e.g.
    ``policies/x.yaml: objectives.1.params.beta: expected a number >= 0, got -1``.
    """


class UnknownNameError(HardenError, KeyError):
    """A name (objective, attack, dataset, model) is not registered.

    ``str()`` gives the plain message, not ``KeyError``'s quoted repr.
    """

    def __init__(self, message: str, name: str = "", suggestions: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.suggestions = suggestions

    def __str__(self) -> str:
        return self.message


class DataError(HardenError, ValueError):
    """Data is missing, empty, or not float pixels in [0, 1] with valid labels."""


class ModelError(HardenError, ValueError):
    """A model cannot be built, loaded, or does not fit the data."""


class ThreatModelError(HardenError, ValueError):
    """An attack was called with inputs that break its threat model (range, shape, dtype)."""


class CheckpointError(HardenError, RuntimeError):
    """A checkpoint is missing, truncated, or fails its hash check."""


class ExportError(HardenError, RuntimeError):
    """ONNX export, checking, or the onnxruntime parity test failed."""
