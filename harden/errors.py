"""One error hierarchy for harden.

Every error harden raises on purpose derives from :class:`HardenError` and also from the
builtin a caller would catch without knowing harden (``ValueError``, ``KeyError``, ...).
Messages follow the pattern "expected ..., got ..." and, where it helps, end with a remedy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
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
    "describe_validation_error",
    "format_key_path",
    "format_validation_error",
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


class InputError(DataError, ThreatModelError):
    """Inputs break the pixel contract: float NCHW pixels in [0, 1], finite, non-empty.

    Raised by the one input check, :func:`harden.data.check_pixels`, wherever pixels enter
    (data batches, attacks, ONNX sessions, export). It is a :class:`DataError` and a
    :class:`ThreatModelError` (an input outside [0, 1] is both), so either ``except`` catches it.
    """


class CheckpointError(HardenError, RuntimeError):
    """A checkpoint is missing, truncated, or fails its hash check."""


class RunFolderError(HardenError, RuntimeError):
    """A run folder is in use by another process, holds another run, or cannot be prepared.

    Raised by the run-folder guard before anything is written: a locked ``--out``, a used folder
    without ``--resume``/``--overwrite``, or checkpoints of another run.
    """


class IntegrityError(HardenError, ValueError):
    """A certificate, its signature, a key file or an artifact it vouches for is not what it claims.

    Raised for unreadable or malformed certificates and keys and for a signature that does not
    verify; ``harden inspect`` reports file-level mismatches as failed checks instead.
    """


class ExportError(HardenError, RuntimeError):
    """ONNX export, checking, or the onnxruntime parity test failed, or a model cannot run as asked.

    The latter is :func:`harden.load_onnx`: no such file, not loadable, or CUDA not running.
    """


_PHRASES: dict[str, str] = {
    "greater_than_equal": "a number >= {ge}",
    "greater_than": "a number > {gt}",
    "less_than_equal": "a number <= {le}",
    "less_than": "a number < {lt}",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "literal_error": "one of {expected}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
    "string_too_short": "a string of at least {min_length} character(s)",
    "string_too_long": "a string of at most {max_length} characters",
    "string_pattern_mismatch": "a string matching {pattern}",
    "finite_number": "a finite number",
    "invalid_key": "a string key",
    "int_parsing_size": "an integer of sane size",
    "bytes_type": "bytes",
    "string_unicode": "a string of valid UTF-8",
}


_PLAIN_KEY = re.compile(r"[\w\-]{1,60}")


def format_key_path(parts: Sequence[Any]) -> str:
    """A key path for messages: ``train.lr``, ``objectives.0.params``; odd keys quoted (``'a b'``).

    Example:
        >>> format_key_path(["train", "lr"]), format_key_path(["objectives", 0, "a b"]), format_key_path([])
        ('train.lr', "objectives.0.'a b'", '(top level)')
    """
    out = []
    for part in parts:
        text = str(part) if isinstance(part, (str, int)) and not isinstance(part, bool) else repr(part)
        if not _PLAIN_KEY.fullmatch(text):
            text = repr(text if len(text) <= 60 else text[:57] + "...")
        out.append(text)
    return ".".join(out) or "(top level)"


def describe_validation_error(err: Any) -> str:
    """One readable phrase for a pydantic error: 'expected ..., got ...'."""
    kind = err["type"]
    if kind == "harden_nested":
        return str(err["ctx"]["msg"])
    if kind == "extra_forbidden":
        return "unknown key (not allowed here)"
    if kind == "missing":
        return "expected a value, got nothing (required key)"
    if kind.startswith("value_error"):
        return str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    got_s = repr(got) if not isinstance(got, (dict, list, tuple)) else f"a {type(got).__name__}"
    if len(got_s) > 60:
        got_s = got_s[:57] + "..."
    phrase = _PHRASES.get(kind)
    if phrase is not None:
        try:
            phrase = phrase.format(**err.get("ctx", {}))
        except (KeyError, IndexError):
            phrase = None
    if phrase is None:
        msg = str(err["msg"])
        phrase = msg.removeprefix("Input should be ").removeprefix("input should be ")
    return f"expected {phrase}, got {got_s}"


def format_validation_error(exc: Any, source: str | None, hint: Callable[[dict[str, Any]], str] | None = None) -> str:
    """One line for a pydantic ``ValidationError``: ``source: key.path: expected ..., got ...``.

    Args:
        exc: the ``ValidationError``.
        source: file name for the prefix (None: no prefix).
        hint: called with the error described; its text (e.g. "; did you mean 'epochs'?") is
            appended to the description.
    """
    errors = exc.errors()
    err = errors[0]
    path = format_key_path(err["loc"])
    if err["type"] == "harden_nested" and err["ctx"]["path"]:  # a dotted path of plain names already
        path = err["ctx"]["path"] if path == "(top level)" else f"{path}.{err['ctx']['path']}"
    # an error on a parent of another error (e.g. a list left empty by a bad item) is a consequence
    locs = [tuple(e["loc"]) for e in errors]
    causes = [e for e, lc in zip(errors, locs, strict=False) if not any(o != lc and o[: len(lc)] == lc for o in locs)]
    others = [e for e in causes if e is not err]
    more = f" (and {len(others)} more)" if others else ""
    prefix = f"{source}: " if source else ""
    extra = hint(err) if hint is not None else ""
    return f"{prefix}{path}: {describe_validation_error(err)}{extra}{more}"
