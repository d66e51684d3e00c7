"""Named choices a recipe picks by name (losses, normalizations, advantage estimators, overlong modes,
data formats): each is registered once, beside its function, with the facts the config checks.

For leaf functions only; the controller's flow stays plain calls (STYLE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """`@REGISTRY.register("name", **facts)` on a function; `REGISTRY["name"]` gives its `Entry`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta):
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, meta)
            return fn
        return add

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
