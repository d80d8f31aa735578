"""Reading, validating, writing and hashing policies.

:mod:`harden.policy` is the pure schema; this module is the validation step that hands it the
registries (:data:`CATALOG`, through pydantic's validation context), so every objective and
attack name is checked and its ``Params`` validated once, here.

YAML is read with a safe loader that also refuses anchors/aliases and duplicate keys; numbers
must be finite and fit in 64 bits; every problem, whatever the bytes of the file, becomes one
:class:`harden.PolicyError` line naming the file and the key path.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harden.attacks import ATTACKS
from harden.data import DATASETS
from harden.errors import PolicyError, format_key_path, format_validation_error
from harden.models import check_timm_name
from harden.objectives import OBJECTIVES
from harden.policy import MAX_POLICY_BYTES, Catalog, ObjectiveSpec, Policy
from harden.registry import did_you_mean

__all__ = ["CATALOG", "checked", "dump_policy", "load_policy", "policy_hash", "validate_policy"]

_ = ObjectiveSpec  # used by the doctests

#: Every registry a policy's names are checked against (plugins included, loaded lazily).
CATALOG = Catalog(objectives=OBJECTIVES, attacks=ATTACKS, datasets=DATASETS, check_model=check_timm_name)


def validate_policy(data: Any, source: str | None = None) -> Policy:
    """Validate a mapping (e.g. parsed YAML) into a :class:`Policy`.

    Args:
        data: the policy document as Python objects.
        source: file name used in error messages.

    Raises:
        PolicyError: the document is invalid; the message names ``source`` and the key path.

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
    return policy


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


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file.

    Args:
        path: a YAML file.

    Returns:
        The validated, frozen :class:`Policy`.

    Raises:
        PolicyError: the file is missing, is not YAML, or is not a valid policy.

    Example:
        >>> policy = load_policy("policies/mnist-pgd.yaml")  # doctest: +SKIP
        >>> policy.objectives[0].name  # doctest: +SKIP
        'pgd_at'
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
        data = yaml.load(text, Loader=_NoAliasLoader)
    except UnicodeDecodeError:
        raise PolicyError(f"{source}: expected UTF-8 text, got undecodable bytes") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        ours = isinstance(exc, yaml.constructor.ConstructorError) and problem.startswith("expected ")
        what = problem if ours else f"expected valid YAML, got {problem}"
        raise PolicyError(f"{source}: {what}{where}") from None
    except RecursionError:
        raise PolicyError(f"{source}: expected a policy of sane depth, got a document nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar YAML resolves but Python refuses (2001-13-45)
        raise PolicyError(f"{source}: expected valid YAML values, got {type(exc).__name__}: {exc}") from None
    return validate_policy(data, source)


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
