"""In-process backends: how a graph pair becomes two callables. A registry keyed by name.

A backend is ``fn(full, shallow, example_inputs, **options) -> CompiledPair``; it knows
nothing of schedules or of the runtime that calls it. The pair it returns is ready to run: a
backend that compiles does so in that call, on ``example_inputs`` (a call of the signature
the pair serves), while the build holds ``compile_lock`` (``warm_up`` runs every graph once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dcfx.registry import Registry

# torch.export and torch.compile keep process-wide state while they trace (dynamo's and
# Inductor's configuration, caches, the fake-tensor machinery): graph builds, meaning
# captures and each compiling first call of a backend's graph, take turns under this lock.
# Steps of built graphs never take it. Captures work on a clone of the module tree
# (dcfx.passes.clone.structural_clone), so a build in one thread leaves the modules
# that other threads' steps and checks read untouched.
compile_lock = threading.RLock()

BufferFn = Callable[[torch.Size, tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@dataclass(frozen=True)
class CompiledPair:
    """``full(*inputs) -> (sample, feature)`` and ``shallow(*inputs, feature) -> sample``.

    With forecasting, also ``forecast(*inputs, feature, previous, coefficient) -> sample``: the
    shallow graph on ``feature + coefficient * (feature - previous)`` (``dcfx.passes.forecast``).

    The runtime calls ``run_full``, ``run_shallow`` and ``run_forecast``. The in-process version
    runs ``full`` and copies the feature into the runtime's buffer; exported formats override
    ``run_full`` to have the graph write the feature into that buffer directly (IO binding).
    """

    full: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    shallow: Callable[..., torch.Tensor]
    # Called once when the runtime drops the pair: frees what the backend keeps beyond the pair.
    release: Callable[[], None] | None = None
    # Whether the graphs read the model's weights from their live storage (eager), so that
    # weights written in place need no rebuild; False where the backend copies them (freezing).
    follows_values: bool = False
    forecast: Callable[..., torch.Tensor] | None = None

    def run_full(self, inputs: tuple[torch.Tensor, ...], buffer_for: BufferFn) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the full graph; returns the sample and the buffer holding the cache feature.

        ``buffer_for(shape, stride, dtype, device)`` returns the runtime's preallocated buffer.
        """
        sample, feature = self.full(*inputs)
        buffer = buffer_for(feature.shape, feature.stride(), feature.dtype, feature.device)
        buffer.copy_(feature)
        return sample, buffer

    def run_shallow(self, inputs: tuple[torch.Tensor, ...], feature: torch.Tensor) -> torch.Tensor:
        """Runs the shallow graph on ``inputs`` and the cached ``feature``; returns the sample."""
        return self.shallow(*inputs, feature)

    def run_forecast(
        self,
        inputs: tuple[torch.Tensor, ...],
        feature: torch.Tensor,
        previous: torch.Tensor,
        coefficient: torch.Tensor,
    ) -> torch.Tensor:
        """Runs the forecast graph: the shallow graph on the feature moved along ``feature - previous``."""
        if self.forecast is None:
            raise RuntimeError("this graph pair was built without the forecast graph")
        return self.forecast(*inputs, feature, previous, coefficient)


class Build(Protocol):
    """What the runtime asks of a build: which calls share a pair, and the pair (``dcfx.builds``)."""

    def bucket(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Hashable | None:
        """Returns the key of the calls one pair serves, or None for one pair per input signature."""
        ...

    def __call__(
        self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool = False
    ) -> CompiledPair:
        """Returns the pair for a call with inputs ``names`` like ``tensors`` (with the forecast graph)."""
        ...


def warm_up(pair: CompiledPair, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Runs every graph of ``pair`` once on ``example_inputs``: what compiles on a first call compiles now."""
    with torch.no_grad():
        _, feature = pair.full(*example_inputs)
        pair.shallow(*example_inputs, feature)
        if pair.forecast is not None:
            # Two distinct tensors, as the runtime's two feature buffers are: torch.compile
            # guards on the aliasing of its inputs, and a warm-up on one tensor twice would
            # leave the first forecast step to compile the graph again (outside the lock,
            # without the build's Inductor settings).
            previous = feature.clone()
            pair.run_forecast(example_inputs, feature, previous, torch.zeros((), device=feature.device))


class Backend(Protocol):
    """A function that turns the full and shallow graphs into a ``CompiledPair``.

    With forecasting, the runtime's build also passes ``forecast=``, the forecast graph, which
    the backend compiles like the shallow one (a backend without it cannot forecast).
    """

    def __call__(  # noqa: D102
        self, full: torch.nn.Module, shallow: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], **options: Any
    ) -> CompiledPair: ...


_BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(name: str, options: tuple[str, ...] = ()) -> Callable[[Backend], Backend]:
    """Returns a decorator that registers a backend under ``name``, taking ``options``."""

    def register(fn: Backend) -> Backend:
        _BACKENDS.add(name, fn, options)
        return fn

    return register


def available_backends() -> list[str]:
    """Returns the registered backend names."""
    return _BACKENDS.names()


def get_backend(name: str) -> Backend:
    """Returns the backend registered as ``name`` (ValueError listing the others if unknown)."""
    return _BACKENDS.get(name)


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Raises TypeError for an option ``backend`` does not take, naming the ones it does."""
    _BACKENDS.check_options(backend, options)


from dcfx.backends import eager, inductor  # noqa: E402,F401  (registration)
