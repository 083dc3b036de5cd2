"""The registry of deployment formats, keyed by name (``dcfx.export(..., format=name)``).

A format is an object with ``check_available()``, ``write(programs, out, **options) -> dict``
(its files go into ``out``; the dict is recorded in the manifest as ``format_data``) and
``load(directory, manifest, **load_options) -> ExportedPair``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dcfx.export.manifest import Manifest


class ExportFormat(Protocol):
    """What a deployment format provides (see the module docstring)."""

    name: str

    def check_available(self) -> None:  # noqa: D102
        ...

    def write(self, programs: Any, out: Path, **options: Any) -> dict[str, Any]:  # noqa: D102
        ...

    def load(self, directory: Path, manifest: Manifest, **options: Any) -> Any:  # noqa: D102
        ...


_FORMATS: dict[str, ExportFormat] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_format(name: str, options: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Returns a class decorator that registers an instance of the class as format ``name``.

    ``options`` are the keyword options its ``write`` takes (checked before any work starts).
    """

    def register(cls: type) -> type:
        _FORMATS[name] = cls()
        _OPTIONS[name] = options
        return cls

    return register


def available_formats() -> list[str]:
    """Returns the registered format names."""
    return sorted(_FORMATS)


def get_format(name: str) -> ExportFormat:
    """Returns the format registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if not isinstance(name, str) or name not in _FORMATS:
        raise ValueError(f"unknown export format {name!r}; available: {', '.join(available_formats())}")
    return _FORMATS[name]


def check_format_options(name: str, options: dict[str, Any]) -> None:
    """Raises TypeError for an option format ``name`` does not take, naming the ones it does."""
    valid = _OPTIONS[name]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"format {name!r} got unknown option(s) {unknown}; it takes: {', '.join(valid) or 'none'}")
