"""The error types a user sees (each message names the key or file and what to do), the did-you-mean helper, and
the one registry that methods, objectives, backbones and data backends are looked up in.

This module imports nothing of dogo's, so that every other module may import it without an import circle.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which and what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read or resumed from; the message names the file."""


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the path and what to do."""


def close_names(name: str, valid: list[str], n: int = 1, cutoff: float = 0.4) -> list[str]:
    """The `n` valid names nearest to `name` (difflib's ratio of at least `cutoff`), nearest first."""
    return difflib.get_close_matches(str(name), valid, n=n, cutoff=cutoff)


def suggest(name: str, valid: list[str], noun: str = "valid keys") -> str:
    """'; did you mean X?' for the nearest valid name, else the list of all of them."""
    near = close_names(name, valid)
    return f"; did you mean '{near[0]}'?" if near else f"; {noun}: {', '.join(valid)}"


T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (`kind`: 'SSL method', 'backbone', ...), registered once each.

    get() raises ConfigError naming the config key, the nearest registered name and all of them.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """@registry.decorator('name') registers what it decorates under that name."""
        return lambda entry: self.register(name, entry)

    def get(self, name: str, key: str) -> T:
        if name in self._entries:
            return self._entries[name]
        raise ConfigError(f"{key}: {name!r} is not a registered {self.kind}"
                          + suggest(str(name), self.names(), "registered"))

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
