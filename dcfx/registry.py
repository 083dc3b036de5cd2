"""A named registry with per-entry options: backends, export formats and schedules are each one."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, each with the keyword options it takes; errors name what exists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._options: dict[str, tuple[str, ...]] = {}

    def add(self, name: str, entry: T, options: tuple[str, ...] = ()) -> None:
        """Registers ``entry`` as ``name`` (replacing one of that name), taking ``options``."""
        self._entries[name] = entry
        self._options[name] = tuple(options)

    def names(self) -> list[str]:
        """Returns the registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """Returns the entry registered as ``name``.

        Raises:
            ValueError: for an unknown name, listing the registered ones.
        """
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """Raises TypeError for an option ``name`` does not take, naming the ones it does."""
        self.get(name)
        valid = self._options[name]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(
                f"{self.kind} {name!r} got unknown option(s) {unknown}; it takes: {', '.join(valid) or 'none'}"
            )
