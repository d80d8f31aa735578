"""The :data:`CodeRef` marker: which policy fields may name importable code, and the format of such names.

A policy file may come from someone else, and a field that names code (``package.module:attr``)
makes harden import and call it. Every such field is declared :data:`CodeRef`, in harden's own
sections and in the ``Params`` of every objective and attack (plugins' included), so
:func:`harden.trust.find_code` finds each one and harden refuses a file naming code the user did
not allow (see ``docs/security.md``). This module holds only the marker and the format check; it
imports nothing of harden.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = ["CODE_REF", "MODULE_ATTR", "CodeRef", "is_code", "is_code_ref"]

#: ``package.module:Name``: a dotted ASCII module name (what ``importlib`` gets), then ONE public
#: attribute of it (a single name not starting with ``_``; no ``a.b`` path, no ``__dunder__``), so
#: a reference can only name what the module itself offers, never reach through it
MODULE_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z][A-Za-z0-9_]*")


def is_code(value: str) -> bool:
    """Whether a :data:`CodeRef` value names importable code (``module:attr``).

    ``timm:<name>`` is not code (timm builds it from its own registry), nor is a registered name.

    Example:
        >>> is_code("mypkg.models:Net"), is_code("timm:resnet10t"), is_code("mnist-5k")
        (True, False, False)
    """
    return ":" in value and not value.startswith("timm:")


def _code_format(value: str) -> str:
    if is_code(value) and not MODULE_ATTR.fullmatch(value):
        raise ValueError(
            "expected 'package.module:Name' (a dotted Python module name, then one public name of it: no dotted "
            f"attribute path, no name starting with '_'), got {value!r}; name the code where it is defined"
        )
    return value


class _CodeRefMarker:
    """The metadata of a :data:`CodeRef` annotation (one instance, :data:`CODE_REF`): marks and checks it."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_code_format, handler(source))

    def __repr__(self) -> str:  # shown wherever the annotation is printed: keep it stable
        return "CODE_REF"


#: the marker in a :data:`CodeRef` annotation
CODE_REF = _CodeRefMarker()

#: A string that may name importable code (``package.module:Name``, one public name); ``timm:<name>`` and registered
#: names are not code. Declare a field with it (``model: CodeRef | None = None``) when its value
#: may be imported: harden then refuses a policy file naming code the user did not allow.
CodeRef = Annotated[str, CODE_REF]


def _holds_marker(annotation: Any) -> bool:
    if annotation is CODE_REF:
        return True
    return any(_holds_marker(arg) for arg in typing.get_args(annotation))


def is_code_ref(field: Any) -> bool:
    """Whether a pydantic field (``model_fields[name]``) is declared :data:`CodeRef` (alone, optional or in a list).

    Example:
        >>> from pydantic import BaseModel
        >>> class P(BaseModel):
        ...     model: CodeRef | None = None
        ...     name: str = "x"
        >>> is_code_ref(P.model_fields["model"]), is_code_ref(P.model_fields["name"])
        (True, False)
    """
    return any(m is CODE_REF for m in getattr(field, "metadata", ())) or _holds_marker(
        getattr(field, "annotation", None)
    )
