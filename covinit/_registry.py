"""A tiny name → function registry shared by strategies and estimators.

Both registries need the same three things: register a function under a name with a
one-line description, look a name up with an error that lists the valid names, and list
what exists.  One class serves both so that adding a strategy or an estimator touches one
place only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered function.

    Attributes
    ----------
    name : str
        Public name, e.g. ``"ledoit_wolf"``.
    fn : callable
        The implementation.
    description : str
        One line shown by ``covinit strategies`` / ``covinit estimators``.
    tags : dict
        Free-form facts about the entry (e.g. which calibration sides it needs).
    """

    name: str
    fn: F
    description: str
    tags: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[F]):
    """Ordered mapping from names to :class:`Entry`.

    Parameters
    ----------
    kind : str
        What the registry holds (``"strategy"``, ``"estimator"``), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, description: str, **tags: Any) -> Callable[[F], F]:
        """Decorator that registers ``fn`` under ``name``.

        Raises
        ------
        ValueError
            If ``name`` is already registered (silently replacing an entry hides bugs).
        """

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, fn, description, dict(tags))
            return fn

        return decorator

    def get(self, name: str) -> Entry[F]:
        """Return the entry for ``name``.

        Raises
        ------
        TypeError
            If ``name`` is not a string.
        ValueError
            If ``name`` is unknown; the message lists the valid names.
        """
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self._entries)
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        """Mapping ``name -> one-line description``."""
        return {e.name: e.description for e in self._entries.values()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
