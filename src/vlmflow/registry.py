"""Registries map a spec's `kind:` to its implementation; spec unions mirror them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, kind: str, item: T) -> T:
        if kind in self._items:
            raise ValueError(f"{self.what} kind {kind!r} is registered twice")
        self._items[kind] = item
        return item

    def decorator(self, kind: str) -> Callable[[T], T]:
        return lambda item: self.register(kind, item)

    def get(self, kind: str) -> T:
        try:
            return self._items[kind]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise KeyError(f"unknown {self.what} kind {kind!r}; known: {known}") from None

    def kinds(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
