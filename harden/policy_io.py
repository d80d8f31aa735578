"""Reading, validating, writing and hashing policies (re-exported by :mod:`harden.policy`).

YAML is read with a safe loader that also refuses anchors/aliases and duplicate keys; every
problem becomes one :class:`harden.PolicyError` line naming the file and the key path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harden.errors import PolicyError, format_validation_error
from harden.policy import MAX_POLICY_BYTES, ObjectiveSpec, Policy

__all__ = ["dump_policy", "load_policy", "policy_hash", "validate_policy"]

_ = ObjectiveSpec  # used by the doctests


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
    if not isinstance(data, dict):
        prefix = f"{source}: " if source else ""
        raise PolicyError(f"{prefix}(top level): expected a mapping of policy keys, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(format_validation_error(exc, source)) from None
    except RecursionError:
        prefix = f"{source}: " if source else ""
        raise PolicyError(
            f"{prefix}(top level): expected a policy of sane depth, got a document nested too deeply"
        ) from None


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing anchors/aliases ('billion laughs') and duplicate keys.

    YAML itself resolves a duplicate key silently (the last one wins), which hides typos.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
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

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # type: ignore[override]
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
    return validate_policy(data, source)


def dump_policy(policy: Policy) -> str:
    """The canonical YAML of a policy (every default filled in, keys in declaration order).

    Example:
        >>> "pgd_at" in dump_policy(Policy(objectives=[ObjectiveSpec(name="pgd_at")]))
        True
    """
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)


def policy_hash(policy: Policy) -> str:
    """SHA-256 of the canonical JSON of a policy (defaults filled, keys sorted).

    Two files that differ only in comments, key order or spelled-out defaults hash the same.
    """
    canonical = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
