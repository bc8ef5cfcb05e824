"""A registry of named things that plugins add to (passes, recipes, metrics)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from slimfleet.agent.errors import InputError


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Items by name, each remembered with the plugin that added it.

    Adding a name twice raises ValueError naming both plugins, so two packages
    cannot silently shadow each other.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, tuple[T, str]] = {}

    def add(self, item: T, plugin: str | None = None) -> None:
        """Register ``item``; ``plugin`` defaults to the module that calls ``add``."""
        plugin = plugin or sys._getframe(1).f_globals.get("__name__", "?")
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
            raise ValueError(f"{plugin}: {self.kind} name {name!r} must be letters, digits or _")
        if name in self._items:
            first = self._items[name][1]
            raise ValueError(f"{self.kind} {name!r} is registered by both {first} and {plugin}")
        self._items[name] = (item, plugin)

    def get(self, name: str) -> T:
        try:
            return self._items[name][0]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise InputError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def plugin_of(self, name: str) -> str:
        return self._items[name][1]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return (item for item, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)
