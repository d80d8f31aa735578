"""Name -> class registries with decorator registration and close-match suggestions.

Third-party packages plug in through entry points: a distribution that declares
``[project.entry-points."harden.objectives"] myobj = "mypkg.objectives:MyObjective"`` makes
``myobj`` available to every policy once the package is installed.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from harden.errors import HardenError, UnknownNameError

__all__ = ["Registry", "did_you_mean", "suggest"]

T = TypeVar("T")


def suggest(name: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> tuple[str, ...]:
    """Return up to ``n`` close matches for ``name`` among ``candidates``.

    Example:
        >>> suggest("pgd-at", ["pgd_at", "trades", "ce"])
        ('pgd_at',)
    """
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    return tuple(lowered[h] for h in hits)


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...], *, or_list: bool = False) -> str:
    """The one "did you mean" hint: ``"; did you mean 'a', 'b'?"``, or ``""`` without a close match.

    Every error about an unknown name (registries, policy keys, params, layers, models) ends
    with this hint, so the wording is the same everywhere.

    Args:
        name: the unknown name.
        candidates: the names that exist.
        or_list: without a close match, list the candidates instead (``"; expected one of a, b"``).

    Example:
        >>> did_you_mean("epoch", ["epochs", "lr"])
        "; did you mean 'epochs'?"
        >>> did_you_mean("zzz", ["epochs", "lr"], or_list=True)
        '; expected one of epochs, lr'
    """
    close = suggest(name, candidates)
    if close:
        return f"; did you mean {', '.join(repr(c) for c in close)}?"
    return f"; expected one of {', '.join(candidates)}" if or_list and candidates else ""


class Registry(Generic[T]):
    """A typed registry of named entries (classes or factories).

    Args:
        kind: what the entries are, for messages ("objective", "attack", ...).
        entry_point_group: the ``importlib.metadata`` group scanned once, lazily, for plugins.

    Example:
        >>> reg: Registry[type] = Registry("widget")
        >>> @reg.register("knob")
        ... class Knob: ...
        >>> reg.get("knob") is Knob
        True
        >>> reg.names()
        ['knob']
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an entry under ``name``; a duplicate name raises."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise HardenError(f"expected a {self.kind} name of letters, digits, '_' or '-', got {name!r}")

        def decorator(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorator

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; raises ``HardenError`` if the name is taken."""
        if name in self._entries and self._entries[name] is not entry:
            raise HardenError(
                f"expected a new {self.kind} name, got {name!r} which is already registered "
                f"to {self._entries[name]!r}; pick another name"
            )
        self._entries[name] = entry

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        assert self.entry_point_group is not None  # set when _plugins_loaded was False
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue
            try:
                self.add(ep.name, ep.load())
            except Exception as exc:  # a broken plugin must not break harden itself
                warnings.warn(
                    f"could not load {self.kind} plugin {ep.name!r} from {ep.value}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def get(self, name: str) -> T:
        """Look ``name`` up; an unknown name raises ``UnknownNameError`` with suggestions."""
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            pass
        names = self.names()
        hints = suggest(name, names)
        raise UnknownNameError(
            f"expected one of the registered {self.kind}s ({', '.join(names)}), got {name!r}{did_you_mean(name, names)}",
            name=name,
            suggestions=hints,
        )

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
