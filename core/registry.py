"""The registries: the names a config may give an SSL method, an objective, a backbone and a data backend.

They live here, on the ground floor, so that the config (which resolves and checks names) reads them without
importing the layers above it. Each registry names its provider, the module that implements its entries and fills
it with `register(name, entry)` at import; the first lookup imports the provider. A family of names sharing a prefix
(`timm:<name>`, any timm model) is one `register_family(prefix, resolve)` whose entries are made on demand.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from dogo.core.errors import ConfigError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (`kind`: 'SSL method', 'backbone', ...), registered once each by `provider`.

    get() raises ConfigError naming the config key, the nearest registered name and all of them.
    """

    def __init__(self, kind: str, provider: str):
        self.kind = kind
        self.provider = provider  # the module whose import registers the entries
        self._entries: dict[str, T] = {}
        self._families: dict[str, Callable[[str, str], T]] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: the provider's own lookups while it imports must not import it again
        try:
            importlib.import_module(self.provider)
        except BaseException:
            self._loaded = False
            raise

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def register_family(self, prefix: str, resolve: Callable[[str, str], T]) -> None:
        """Names `prefix<rest>` are entries made by resolve(rest, key), which raises ConfigError naming `key` for a
        rest it does not know."""
        self._families[prefix] = resolve

    def get(self, name: str, key: str) -> T:
        self._load()
        if name in self._entries:
            return self._entries[name]
        for prefix, resolve in self._families.items():
            if isinstance(name, str) and name.startswith(prefix):
                return resolve(name[len(prefix):], key)
        families = "".join(f"; or {prefix}<name>" for prefix in self._families)
        raise ConfigError(f"{key}: {name!r} is not a registered {self.kind}"
                          + suggest(str(name), self.names(), "registered") + families)

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def items(self):
        self._load()
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


METHODS = Registry("SSL method", provider="dogo.engine.ssl.methods")  # peers.NAME.ssl
OBJECTIVES = Registry("objective or SSL method", provider="dogo.engine.ssl.objectives")  # objective.name
BACKBONES = Registry("backbone", provider="dogo.models.backbones")  # peers.NAME.arch
BACKENDS = Registry("data backend", provider="dogo.pipelines")  # data.backend
