"""Which code a policy may name: its code references, and the user's opt-in.

A policy file may come from someone else, and every field declared
:data:`harden.coderef.CodeRef` (``model.name``, ``data.name``, the ``transfer`` attack's
``params.model``, any plugin's) may name code harden would import and call
(``package.module:attr``). :func:`find_code` lists what a validated policy names;
:func:`refuse_code` refuses what ``allow_code`` does not allow (the CLI's ``--allow-code PACKAGE``
and ``--trust-policy-code``; see ``docs/security.md``). Nothing here imports what a policy names.

:mod:`harden.policy_io` applies them to policies: ``code_references(policy)`` and
``check_code(policy, allow_code)`` check a policy built in Python first, so its plugins' params are
walked too; ``load_policy`` refuses a file naming code not allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from harden.coderef import MODULE_ATTR, is_code, is_code_ref
from harden.errors import PolicyError, format_key_path
from harden.schema import AttackSpec, ObjectiveSpec

__all__ = ["BUILTIN_CODE", "CodeReference", "allowed_modules", "find_code", "refuse_code"]

#: code references every policy may name without an opt-in: harden's own tiny model classes (used
#: by the shipped ``digits`` policies), which take nothing but sizes
BUILTIN_CODE = frozenset(
    {"harden.testing:TinyCNN", "harden.testing:TinyMLP", "harden.tiny:TinyCNN", "harden.tiny:TinyMLP"}
)


@dataclass(frozen=True)
class CodeReference:
    """One place where a policy names importable code.

    Attributes:
        path: the key path in the policy (``model.name``, ``verify.attacks.3.params.model``).
        ref: what it names, ``package.module:attr``.

    Example:
        >>> ref = CodeReference("model.name", "mypkg.models:Net")
        >>> ref.module, ref.package
        ('mypkg.models', 'mypkg')
    """

    path: str
    ref: str

    @property
    def module(self) -> str:
        """The module harden would import (``mypkg.models``)."""
        return self.ref.partition(":")[0]

    @property
    def package(self) -> str:
        """The top-level package of :attr:`module` (``mypkg``)."""
        return self.module.partition(".")[0]


def find_code(model: BaseModel) -> list[CodeReference]:
    """Every code reference of a validated policy (or section), in document order.

    Walks every field declared :data:`harden.coderef.CodeRef` (alone or in a list, tuple or
    mapping), the checked ``Params`` of each objective and attack included. ``timm:`` models and
    registered names are not code. The raw params of a spec validated without a catalog are not
    walked: pass a checked policy (``harden.policy_io.code_references`` checks it first).

    Example:
        >>> from harden.sources import ModelSpec
        >>> find_code(ModelSpec(name="mypkg.models:Net")), find_code(ModelSpec(name="timm:resnet10t"))
        ([CodeReference(path='name', ref='mypkg.models:Net')], [])
    """
    out: list[CodeReference] = []
    # (key path, node, under a CodeRef field): no recursion, a plugin's params may nest deeply
    stack: list[tuple[tuple[Any, ...], Any, bool]] = [((), model, False)]
    while stack:
        path, node, code = stack.pop()
        children: list[tuple[tuple[Any, ...], Any, bool]] = []
        if isinstance(node, BaseModel):
            spec = node if isinstance(node, (ObjectiveSpec, AttackSpec)) else None
            for name, field in type(node).model_fields.items():
                if not (spec and name == "params"):  # a spec's raw params: its checked Params below
                    children.append(((*path, name), getattr(node, name), code or is_code_ref(field)))
            if spec is not None and spec.checked_params is not None:
                children.append(((*path, "params"), spec.checked_params, code))
        elif isinstance(node, (list, tuple)):
            children = [((*path, i), v, code) for i, v in enumerate(node)]
        elif isinstance(node, dict):
            children = [((*path, k), v, code) for k, v in node.items()]
        elif code and isinstance(node, str) and is_code(node):
            out.append(CodeReference(format_key_path(path), node))
        stack.extend(reversed(children))
    return out


def allowed_modules(allow_code: bool | Sequence[str]) -> bool | list[str]:
    """``allow_code`` checked: True, False or a list of dotted module names (one name alone is a list of one).

    Raises:
        PolicyError: anything else (the caller's error, whatever a policy holds).

    Example:
        >>> allowed_modules(False), allowed_modules("mypkg"), allowed_modules(("a", "b.c"))
        (False, ['mypkg'], ['a', 'b.c'])
    """
    if isinstance(allow_code, bool):
        return allow_code
    names = [allow_code] if isinstance(allow_code, str) else allow_code
    if not isinstance(names, Sequence) or not all(
        isinstance(n, str) and MODULE_ATTR.fullmatch(f"{n}:x") for n in names
    ):
        raise PolicyError(
            f"expected allow_code True, False or module names such as ['mypkg', 'mypkg.models'], got {allow_code!r}"
        )
    return list(names)


def refuse_code(
    refs: Sequence[CodeReference], allow_code: bool | Sequence[str] = False, *, source: str | None = None
) -> list[CodeReference]:
    """Raise at the first reference ``allow_code`` does not allow; return the references.

    Args:
        refs: code references (:func:`find_code`).
        allow_code: True allows every reference; False only :data:`BUILTIN_CODE`; module or
            package names allow the references whose module is one of them or under one
            (``"mypkg"`` allows ``mypkg.models:Net``, not ``mypkgx:Net``).
        source: file name used in the message.

    Raises:
        PolicyError: ``allow_code`` is malformed, or the first reference not allowed (one line:
            the key path, the reference and the remedy).

    Example:
        >>> refs = [CodeReference("model.name", "mypkg.models:Net")]
        >>> [r.package for r in refuse_code(refs, ["mypkg"])]
        ['mypkg']
        >>> refuse_code(refs, ["mypkgx"])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        harden.errors.PolicyError: model.name: 'mypkg.models:Net' is code; ...
    """
    allowed = allowed_modules(allow_code)
    if allowed is True:
        return list(refs)
    names = allowed if isinstance(allowed, list) else []
    for ref in refs:
        if ref.ref in BUILTIN_CODE or any(ref.module == n or ref.module.startswith(f"{n}.") for n in names):
            continue
        prefix = f"{source}: " if source else ""
        raise PolicyError(
            f"{prefix}{ref.path}: {ref.ref!r} is code, expected none unless allowed: harden imports code named in a "
            f"policy only when you allow it; pass --allow-code {ref.module} (or --trust-policy-code), or "
            f"allow_code=[{ref.module!r}] in Python"
        )
    return list(refs)
