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
from dcfx.registry import Registry


class ExportFormat(Protocol):
    """What a deployment format provides (see the module docstring)."""

    name: str

    def check_available(self) -> None:  # noqa: D102
        ...

    def write(self, programs: Any, out: Path, **options: Any) -> dict[str, Any]:  # noqa: D102
        ...

    def load(self, directory: Path, manifest: Manifest, **options: Any) -> Any:  # noqa: D102
        ...


_FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(name: str, options: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Returns a class decorator that registers an instance of the class as format ``name``.

    ``options`` are the keyword options its ``write`` takes (checked before any work starts).
    """

    def register(cls: type) -> type:
        _FORMATS.add(name, cls(), options)
        return cls

    return register


def available_formats() -> list[str]:
    """Returns the registered format names."""
    return _FORMATS.names()


def get_format(name: str) -> ExportFormat:
    """Returns the format registered as ``name`` (ValueError listing the others if unknown)."""
    return _FORMATS.get(name)


def check_format_options(name: str, options: dict[str, Any]) -> None:
    """Raises TypeError for an option format ``name`` does not take, naming the ones it does."""
    _FORMATS.check_options(name, options)
