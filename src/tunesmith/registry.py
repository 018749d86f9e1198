"""One small registry per extension point (methods, data formats, templates, metrics).

Names are registered explicitly; a duplicate or an unknown name fails loudly and lists the valid
ones, so a typo in a recipe never falls back to a default silently.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from tunesmith.errors import TunesmithError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return a " Did you mean 'x'?" hint for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    Args:
        kind: What is registered ("method", "data format", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object under ``name``.

        Raises:
            ValueError: If ``name`` is already registered (a programming error, not a user one).
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def register_kind(self, obj: T) -> T:
        """Decorator that registers a class under its own ``kind`` attribute (the name is written once)."""
        return self.register(obj.kind)(obj)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            TunesmithError: If nothing is registered under that name; lists the valid names.
        """
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            hint = did_you_mean(name, list(self._entries))
            raise TunesmithError(f"unknown {self.kind} '{name}'.{hint} Valid: {valid}.") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
