"""The validation context of a policy: the registries its names and params are checked against.

:class:`Catalog` is what the validation step hands in through pydantic's validation context
(``context={"harden": catalog}``); :func:`catalog_of` reads it back inside a validator. The
schema (:mod:`harden.schema`, :mod:`harden.policy`) imports no registry: what it checks against
arrives here, as :class:`Lookup` objects. :data:`harden.policy_io.CATALOG` is the full one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationInfo

__all__ = ["Catalog", "Lookup", "catalog_of"]


class Lookup(Protocol):
    """What the schema needs of a registry: ``get(name)`` (raising ``UnknownNameError``) and ``names()``."""

    def get(self, name: str) -> Any:
        """The entry registered as ``name``."""
        ...

    def names(self) -> list[str]:
        """Every registered name."""
        ...


@dataclass(frozen=True)
class Catalog:
    """The registries a policy's names and params are checked against (the validation context).

    Passed as ``context={"harden": catalog}`` to ``model_validate``; a field whose lookup is
    None is checked for structure only. :data:`harden.policy_io.CATALOG` is the full one.

    Attributes:
        objectives: objective classes by name (each with a ``Params`` model).
        attacks: attack classes by name (each with ``Params``, ``bounded``, ``changes_label``).
        datasets: dataset loaders by name.
        check_model: raises ``UnknownNameError`` for an unknown ``timm:`` model name.

    Example:
        >>> from harden.registry import Registry
        >>> Catalog().complete, Catalog(attacks=Registry("attack")).complete
        (False, False)
    """

    objectives: Lookup | None = None
    attacks: Lookup | None = None
    datasets: Lookup | None = None
    check_model: Callable[[str], None] | None = None

    @property
    def complete(self) -> bool:
        """Whether every name of a policy can be checked."""
        return None not in (self.objectives, self.attacks, self.datasets, self.check_model)


def catalog_of(info: ValidationInfo) -> Catalog:
    """The :class:`Catalog` of a validation (an empty one, checking structure only, when none was given).

    Example:
        >>> from pydantic import BaseModel, ValidationInfo, field_validator
        >>> class P(BaseModel):
        ...     x: int = 0
        ...     @field_validator("x")
        ...     @classmethod
        ...     def _seen(cls, x: int, info: ValidationInfo) -> int:
        ...         return int(catalog_of(info).complete)
        >>> P.model_validate({"x": 5}).x  # no context: an empty catalog
        0
    """
    context = info.context if isinstance(info.context, dict) else {}
    found = context.get("harden")
    return found if isinstance(found, Catalog) else Catalog()
