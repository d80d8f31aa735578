"""``harden.certificate_io``: reading ``certificate.json`` as a hostile file, strictly.

A certificate may come from anyone (``harden inspect`` reads what it is handed), so reading one
is bounded and strict: :func:`read_capped` opens it without blocking (a FIFO in its place must
not hang), refuses anything but a regular file and anything over :data:`MAX_CERTIFICATE_BYTES`;
:func:`load_strict` refuses duplicate keys, NaN and numbers that overflow to infinity before the
pydantic model validates the bytes in strict mode (nothing coerced), and turns every failure
into one :class:`~harden.errors.IntegrityError` line naming the file.

:meth:`harden.certificate.Certificate.load` is the caller; this module knows the model only as
a pydantic class, so it sits below :mod:`harden.certificate`.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from harden.errors import IntegrityError, format_validation_error

__all__ = ["MAX_CERTIFICATE_BYTES", "load_strict", "read_capped"]

#: ``Certificate.load`` refuses larger files (a real one, saliency maps included, is well under 1 MiB).
MAX_CERTIFICATE_BYTES = 64 * 1024 * 1024

_M = TypeVar("_M", bound=BaseModel)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"expected unique keys, got {dup[:60]!r} twice")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"expected finite numbers, got {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: would serialize as null, unlike what was signed
        raise ValueError(f"expected finite numbers, got {text[:40]}")
    return value


def read_capped(p: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_CERTIFICATE_BYTES`; one-line IntegrityError otherwise.

    Opened without blocking (a FIFO in its place must not hang ``harden inspect``), and refused
    unless it is a regular file (a link to one is followed; ``/dev/zero`` is not one). At most
    one byte more than the cap is read, so a huge file costs no more than the cap.

    Raises:
        IntegrityError: missing or unreadable, not a regular file, or larger than the cap.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "certificate.json"
        >>> _ = p.write_bytes(b"{}")
        >>> read_capped(p)
        b'{}'
        >>> read_capped(p.parent)
        Traceback (most recent call last):
        ...
        harden.errors.IntegrityError: ...: expected a readable certificate, got not a regular file (a FIFO, device or folder)
    """
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise IntegrityError(f"{p}: expected a readable certificate, got {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"{p}: expected a readable certificate, got not a regular file (a FIFO, device or folder)")
    with os.fdopen(fd, "rb") as fh:
        try:
            raw = fh.read(MAX_CERTIFICATE_BYTES + 1)
        except OSError as exc:
            raise IntegrityError(f"{p}: expected a readable certificate, got {exc.strerror or exc}") from None
    if len(raw) > MAX_CERTIFICATE_BYTES:
        raise IntegrityError(f"{p}: expected a certificate under {MAX_CERTIFICATE_BYTES >> 20} MiB, got a larger file")
    return raw


def load_strict(p: Path, cls: type[_M], check: Callable[[_M], object] | None = None) -> _M:
    """Read the file ``p`` (:func:`read_capped`) and validate it strictly as a ``cls``.

    Duplicate keys, NaN / Infinity and numbers overflowing to infinity (``1e400``) are refused;
    validation is strict: nothing is coerced (``"n": "96"`` or ``96.0`` is refused, not read as
    96), while JSON arrays fill tuple fields.

    Args:
        p: the file.
        cls: the pydantic model to validate it as.
        check: called on the validated model; a ValueError it raises (e.g. text that cannot be
            encoded) is reported like the others.

    Returns:
        The validated model.

    Raises:
        IntegrityError: one line naming the file: unreadable or too large (:func:`read_capped`),
            not UTF-8, not JSON, nested too deeply, or not a valid ``cls``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from pydantic import BaseModel
        >>> class Doc(BaseModel):
        ...     n: int
        >>> p = Path(tempfile.mkdtemp()) / "doc.json"
        >>> _ = p.write_text('{"n": 96}')
        >>> load_strict(p, Doc)
        Doc(n=96)
        >>> _ = p.write_text('{"n": 96, "n": 97}')
        >>> load_strict(p, Doc)
        Traceback (most recent call last):
        ...
        harden.errors.IntegrityError: ...doc.json: expected a valid certificate (JSON), got expected unique keys, got 'n' twice
    """
    raw = read_capped(p)
    try:
        json.loads(  # duplicate keys, NaN, 1e400 refused here; the model is validated from the bytes
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
        # strict: no coercion ("96" is not n=96); from JSON, so arrays still fill tuple fields
        out = cls.model_validate_json(raw, strict=True)
        if check is not None:
            check(out)
    except RecursionError:
        raise IntegrityError(f"{p}: expected a certificate of sane depth, got a document nested too deeply") from None
    except UnicodeDecodeError:
        raise IntegrityError(f"{p}: expected UTF-8 JSON, got undecodable bytes") from None
    except ValidationError as exc:
        raise IntegrityError(format_validation_error(exc, str(p))) from None
    except ValueError as exc:  # JSONDecodeError, the hooks above, huge integers, unserializable text
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise IntegrityError(f"{p}: expected a valid certificate (JSON), got {msg}") from None
    return out
