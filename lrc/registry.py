"""A name -> factory registry, one per extension point (factorization methods, allocators)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .config import suggest
from .errors import ConfigError
from .value_types import check_fields

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes; `create(name, options)` builds one, turning bad names/options into ConfigError."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}{suggest(name, self.names())}")
        return self._entries[name]

    def create(self, name: str, options: dict[str, Any] | None = None) -> T:
        cls = self.get(name)
        options = dict(options or {})
        if dataclasses.is_dataclass(cls):
            valid = [f.name for f in dataclasses.fields(cls) if f.init]  # not the state a class keeps itself
            for key in options:
                if key not in valid:
                    hint = suggest(key, valid) if valid else " (it takes no options)"
                    raise ConfigError(f"unknown option {key!r} for {self.kind} {name!r}{hint}")
            check_fields(cls, options, where=f"(option of {self.kind} {name!r})")
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad options for {self.kind} {name!r}: {exc}") from None
