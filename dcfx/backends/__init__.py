"""In-process backends: how a graph pair becomes two callables. A registry keyed by name.

A backend is ``fn(full, shallow, example_inputs, **options) -> CompiledPair``; it knows
nothing of schedules or of the runtime that calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class CompiledPair:
    """``full(*inputs) -> (sample, feature)`` and ``shallow(*inputs, feature) -> sample``."""

    full: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    shallow: Callable[..., torch.Tensor]


class Backend(Protocol):
    """A function that turns the full and shallow graphs into a ``CompiledPair``."""

    def __call__(  # noqa: D102
        self, full: torch.nn.Module, shallow: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], **options: Any
    ) -> CompiledPair: ...


_BACKENDS: dict[str, Backend] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_backend(name: str, options: tuple[str, ...] = ()) -> Callable[[Backend], Backend]:
    """Returns a decorator that registers a backend under ``name``, taking ``options``."""

    def register(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        _OPTIONS[name] = options
        return fn

    return register


def available_backends() -> list[str]:
    """Returns the registered backend names."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Returns the backend registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(available_backends())}")
    return _BACKENDS[name]


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Raises TypeError for an option ``backend`` does not take, naming the ones it does."""
    get_backend(backend)
    valid = _OPTIONS[backend]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"backend {backend!r} got unknown option(s) {unknown}; it takes: {', '.join(valid) or 'none'}")


from dcfx.backends import eager, inductor  # noqa: E402,F401  (registration)
