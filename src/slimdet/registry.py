"""Small typed registries filled by decorators and looked up by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slimdet.errors import ConfigError

T = TypeVar("T")


def closest(name: str, options: list[str]) -> str | None:
    """The option closest to ``name``, or None when nothing is close."""
    hits = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return hits[0] if hits else None


def unknown_name_message(kind: str, name: str, options: list[str]) -> str:
    msg = f"unknown {kind} {name!r}; known: {', '.join(sorted(options))}"
    hint = closest(name, options)
    return msg + (f" (did you mean {hint!r}?)" if hint else "")


class Registry(Generic[T]):
    """Maps names to objects; unknown names fail with the known list and the closest match."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, list(self._items))) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
