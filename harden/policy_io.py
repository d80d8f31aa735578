"""Reading, validating, writing and hashing policies.

:mod:`harden.policy` is the pure schema; this module is the validation step that hands it the
registries (:data:`CATALOG`, through pydantic's validation context), so every objective and
attack name is checked and its ``Params`` validated once, here.

YAML is read with a safe loader that also refuses anchors/aliases and duplicate keys; numbers
must be finite and fit in 64 bits; every problem, whatever the bytes of the file, becomes one
:class:`harden.PolicyError` line naming the file and the key path.

**Code named in a policy.** A policy file may come from someone else, and ``model.name``,
``data.name`` and the ``transfer`` attack's ``params.model`` (every field declared
:data:`harden.coderef.CodeRef`) may name code harden would import and call
(``package.module:attr``). :func:`load_policy`, the one door from files to policies, refuses a
file naming code the caller did not allow (``allow_code``; the CLI's ``--allow-code PACKAGE``
and ``--trust-policy-code``); :func:`code_references` lists what a policy names. A policy built
in Python (``Policy(...)``, :func:`validate_policy` on your own mapping) is the caller's own
code and is not restricted. Validation itself never imports what a policy names. The walk and
the check are :mod:`harden.trust`'s (``BUILTIN_CODE`` and ``CodeReference`` are importable from
here too).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harden.attacks import ATTACKS
from harden.data import DATASETS
from harden.errors import PolicyError, format_key_path, format_validation_error
from harden.model_load import check_timm_name
from harden.objectives import OBJECTIVES
from harden.policy import MAX_POLICY_BYTES, Catalog, ObjectiveSpec, Policy
from harden.registry import did_you_mean
from harden.trust import BUILTIN_CODE, CodeReference, allowed_modules, find_code, refuse_code

__all__ = [
    "BUILTIN_CODE",
    "CATALOG",
    "CodeReference",
    "apply_overrides",
    "check_code",
    "checked",
    "code_references",
    "dump_policy",
    "load_policy",
    "policy_hash",
    "validate_policy",
]

_ = ObjectiveSpec  # used by the doctests

#: Every registry a policy's names are checked against (plugins included, loaded lazily).
CATALOG = Catalog(objectives=OBJECTIVES, attacks=ATTACKS, datasets=DATASETS, check_model=check_timm_name)


def validate_policy(data: Any, source: str | None = None, *, allow_code: bool | Sequence[str] = True) -> Policy:
    """Validate a mapping (e.g. parsed YAML) into a :class:`Policy`.

    A mapping built by your own Python code may name your code (``allow_code=True``, the
    default). For a mapping that comes from outside (a file, a request), pass ``allow_code=False``
    or the packages you trust, as :func:`load_policy` does; better, let :func:`load_policy` read
    the file.

    Args:
        data: the policy document as Python objects.
        source: file name used in error messages.
        allow_code: the code the document may name (see :func:`check_code`).

    Raises:
        PolicyError: the document is invalid, or names code ``allow_code`` does not allow; the
            message names ``source`` and the key path.

    Example:
        >>> validate_policy({"objectives": [{"name": "ce"}]}).objectives[0].name
        'ce'
    """
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise PolicyError(f"{prefix}(top level): expected a mapping of policy keys, got {type(data).__name__}")
    _refuse_insane_numbers(data, prefix)  # before pydantic: e.g. 10**100 where an int is expected
    try:
        policy = Policy.model_validate(data, context={"harden": CATALOG})
    except ValidationError as exc:
        raise PolicyError(format_validation_error(exc, source, hint=_unknown_key_hint)) from None
    except RecursionError:
        raise PolicyError(
            f"{prefix}(top level): expected a policy of sane depth, got a document nested too deeply"
        ) from None
    _refuse_insane_numbers(policy.model_dump(), prefix)  # after: strings such as "1e999" parse to inf
    if allow_code is not True:
        check_code(policy, allow_code, source=source)
    return policy


def code_references(policy: Policy) -> list[CodeReference]:
    """Every code reference of a policy, in document order (``timm:`` models and registered names are not code).

    Walks every field declared :data:`harden.coderef.CodeRef` (alone or in a list, tuple or
    mapping), the ``Params`` of each objective and attack included (a policy built in Python is
    checked first, :func:`checked`); see :func:`harden.trust.find_code`.

    Example:
        >>> policy = validate_policy({"model": {"name": "harden.testing:TinyCNN"}, "objectives": [{"name": "ce"}]})
        >>> code_references(policy)
        [CodeReference(path='model.name', ref='harden.testing:TinyCNN')]
    """
    return find_code(checked(policy))


def check_code(
    policy: Policy, allow_code: bool | Sequence[str] = False, *, source: str | None = None
) -> list[CodeReference]:
    """Refuse a policy naming code ``allow_code`` does not allow; return its code references.

    Args:
        policy: the policy.
        allow_code: True allows every reference; False only :data:`BUILTIN_CODE`; module or
            package names allow the references whose module is one of them or under one
            (``"mypkg"`` allows ``mypkg.models:Net``, not ``mypkgx:Net``); see
            :func:`harden.trust.refuse_code`.
        source: file name used in the message.

    Raises:
        PolicyError: a malformed ``allow_code``, or the first reference not allowed (one line:
            the key path, the reference and the remedy).

    Example:
        >>> policy = validate_policy({"model": {"name": "mypkg.models:Net"}, "objectives": [{"name": "ce"}]})
        >>> [r.package for r in check_code(policy, ["mypkg"])]
        ['mypkg']
        >>> check_code(policy)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        harden.errors.PolicyError: model.name: 'mypkg.models:Net' is code; ...
    """
    allowed = allowed_modules(allow_code)  # a bad allow_code first, whatever the policy holds
    return refuse_code(code_references(policy), allowed, source=source)


#: the largest integer a policy may hold (int64): beyond it nothing in harden means anything
MAX_POLICY_INT = 2**63 - 1


def _refuse_insane_numbers(data: Any, prefix: str) -> None:
    """Raise :class:`PolicyError` at the first non-finite float or integer beyond int64 in ``data``.

    Walks the document without recursion, so any depth is safe, in document order.
    """
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        path, node = stack.pop()
        where = format_key_path(path)
        if isinstance(node, bool):
            continue
        if isinstance(node, int) and abs(node) > MAX_POLICY_INT:
            digits = int(node.bit_length() * math.log10(2)) + 1
            raise PolicyError(
                f"{prefix}{where}: expected a number of sane size (|n| < 2**63), got an integer of ~{digits} digits"
            )
        if isinstance(node, float) and not math.isfinite(node):
            raise PolicyError(f"{prefix}{where}: expected a finite number, got {node}")
        if isinstance(node, dict):
            for key in node:  # a key too: str() of a huge int raises ValueError
                if isinstance(key, int) and not isinstance(key, bool) and abs(key) > MAX_POLICY_INT:
                    raise PolicyError(f"{prefix}{where}: expected string keys, got an integer key beyond 2**63")
            stack.extend(reversed([((*path, k), v) for k, v in node.items()]))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed([((*path, i), v) for i, v in enumerate(node)]))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``tuple[X, ...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: tuple[Any, ...]) -> list[str] | None:
    """The keys allowed in the mapping at ``loc`` (the path of a key inside it), if known."""
    model: type[BaseModel] = Policy
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list: same model
            continue
        field = model.model_fields.get(str(part))
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return list(model.model_fields)


def _unknown_key_hint(err: dict[str, Any]) -> str:
    """For an unknown key: the close matches among the allowed keys, or the allowed keys."""
    if err["type"] != "extra_forbidden" or not err["loc"]:
        return ""
    allowed = _allowed_keys(tuple(err["loc"]))
    if not allowed:
        return ""
    return did_you_mean(str(err["loc"][-1]), allowed, or_list=True)


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing anchors/aliases ('billion laughs') and duplicate keys.

    YAML itself resolves a duplicate key silently (the last one wins), which hides typos.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = "an alias" if isinstance(event, yaml.AliasEvent) else f"an anchor (&{event.anchor})"
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"expected plain YAML, got {what} (anchors and aliases are not allowed in policies)",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"expected unique keys, got {key_node.value!r} twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads ``1e-3`` as the *string* "1e-3" (its floats need a dot); YAML 1.2 and
# every user read it as a number. Policies use the 1.2 rule, so strict numbers accept it.
_NoAliasLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` read with :class:`_NoAliasLoader`; every YAML problem one :class:`PolicyError` naming ``where``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        ours = isinstance(exc, yaml.constructor.ConstructorError) and problem.startswith("expected ")
        what = problem if ours else f"expected valid YAML, got {problem}"
        raise PolicyError(f"{where}: {what}{at}") from None
    except RecursionError:
        raise PolicyError(f"{where}: expected a policy of sane depth, got a document nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar YAML resolves but Python refuses (2001-13-45)
        raise PolicyError(f"{where}: expected valid YAML values, got {type(exc).__name__}: {exc}") from None


def apply_overrides(data: Any, overrides: Sequence[str], source: str | None = None) -> Any:
    """``data`` (a parsed policy document) with each ``key.path=value`` override set, before validation.

    Keys are dotted paths (``train.epochs``, ``objectives.0.weight``: an integer part indexes a
    list); a missing mapping on the way is created. Values are read as YAML by the loader
    policies use (``1e-3`` is a number, ``[0.1, 0.2]`` a list, an empty value is null).
    ``data`` is not changed: a copy is returned. Validation, and the check of the code a policy
    names, come after, on the result (:func:`load_policy`).

    Args:
        data: the policy document as Python objects (a mapping).
        overrides: ``"key.path=value"`` strings, applied in order.
        source: file name used in error messages.

    Raises:
        PolicyError: a malformed override, or a path that does not fit the document (one line
            naming the override).

    Example:
        >>> apply_overrides({"train": {"epochs": 5}, "objectives": [{"name": "ce"}]},
        ...                 ["train.epochs=1", "objectives.0.weight=0.5", "verify.n_examples=200"])
        {'train': {'epochs': 1}, 'objectives': [{'name': 'ce', 'weight': 0.5}], 'verify': {'n_examples': 200}}
    """
    doc = copy.deepcopy(data)
    prefix = f"{source}: " if source else ""
    for text in overrides:
        key, sep, value = str(text).partition("=")
        where = f"{prefix}--set {key.strip()}"
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise PolicyError(f"{prefix}--set: expected key.path=value (e.g. train.epochs=1), got {text!r}")
        if len(value.encode()) > MAX_POLICY_BYTES:
            raise PolicyError(f"{where}: expected a value under {MAX_POLICY_BYTES} bytes, got {len(value.encode())}")
        parsed = _parse_yaml(value, where)
        node: Any = doc
        for i, part in enumerate(parts):
            here = format_key_path(parts[:i]) if i else "(top level)"
            last = i == len(parts) - 1
            if isinstance(node, dict):
                if last:
                    node[part] = parsed
                else:
                    node = node.setdefault(part, {})
            elif isinstance(node, list):
                if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
                    raise PolicyError(
                        f"{where}: expected an index below {len(node)} into the list at {here}, got {part!r}"
                    )
                if last:
                    node[int(part)] = parsed
                else:
                    node = node[int(part)]
            else:
                raise PolicyError(f"{where}: expected a mapping or list at {here}, got {type(node).__name__}")
    return doc


def load_policy(path: str | Path, *, allow_code: bool | Sequence[str] = False, overrides: Sequence[str] = ()) -> Policy:
    """Read and validate a policy file: the one door from files to policies.

    A policy file may come from someone else: one naming code (``model.name: mypkg:Net``, see
    :func:`code_references`) loads only when ``allow_code`` allows it. Nothing the policy names
    is imported here; :func:`harden.run` and the other steps import it later.

    Args:
        path: a YAML file.
        allow_code: True: any code (the CLI's ``--trust-policy-code``); module or package names:
            code under them (``["mypkg"]``, the CLI's ``--allow-code mypkg``); False: none but
            :data:`BUILTIN_CODE`.
        overrides: ``"key.path=value"`` strings (the CLI's ``--set``) applied to the document
            before validation (see :func:`apply_overrides`); the code check sees the result, so
            an override cannot name code ``allow_code`` does not allow. Errors then name the
            file "with --set" and the key path.

    Returns:
        The validated, frozen :class:`Policy`.

    Raises:
        PolicyError: the file is missing, is not YAML, is not a valid policy, names code
            ``allow_code`` does not allow, or an override is malformed.

    Example:
        >>> policy = load_policy("policies/mnist-pgd.yaml", overrides=["train.epochs=1"])  # doctest: +SKIP
        >>> policy.objectives[0].name, policy.train.epochs  # doctest: +SKIP
        ('pgd_at', 1)
    """
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{source}: expected a readable policy file, got {exc.strerror or exc}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: expected a policy under {MAX_POLICY_BYTES} bytes, got {len(raw)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{source}: expected UTF-8 text, got undecodable bytes") from None
    data = _parse_yaml(text, source)
    allowed_modules(allow_code)  # a bad allow_code is the caller's error, whatever the file holds
    if overrides:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: (top level): expected a mapping of policy keys, got {type(data).__name__}")
        data = apply_overrides(data, overrides, source)
        keys = ", ".join(str(o).partition("=")[0].strip() for o in overrides)
        source = f"{source} with --set {keys}"
    return validate_policy(data, source, allow_code=allow_code)


def checked(policy: Policy) -> Policy:
    """``policy`` with every name and param checked against the registries.

    A policy built in Python (``Policy(...)``) was checked for structure only; this validates it
    through :data:`CATALOG` (filling every param default). A checked policy is returned as is.

    Raises:
        PolicyError: a name or param is invalid.

    Example:
        >>> raw = Policy(objectives=[ObjectiveSpec(name="pgd_at")])
        >>> raw.objectives[0].params, checked(raw).objectives[0].params["steps"]
        ({}, 7)
    """
    if not isinstance(policy, Policy):
        raise PolicyError(f"expected a harden.Policy, got {type(policy).__name__}")
    if policy.checked:
        return policy
    return validate_policy(policy.model_dump(mode="json"), source=f"policy {policy.name!r}")


def dump_policy(policy: Policy) -> str:
    """The canonical YAML of a policy (every default filled in, keys in declaration order).

    Fields added after a policy format was in use are left out at their defaults
    (``verify.sweep_steps``, an objective's ``every``, a params model's ``added_later``), so an
    older policy dumps and hashes as it did.

    Example:
        >>> "pgd_at" in dump_policy(Policy(objectives=[ObjectiveSpec(name="pgd_at")]))
        True
    """
    return yaml.safe_dump(checked(policy).model_dump(mode="json"), sort_keys=False)


def policy_hash(policy: Policy) -> str:
    """SHA-256 of the canonical JSON of a policy (defaults filled, keys sorted).

    Two files that differ only in comments, key order or spelled-out defaults hash the same.
    """
    canonical = json.dumps(checked(policy).model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
