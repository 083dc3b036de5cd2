"""What a shallow step reads: the cached deep feature, or a forecast of it.

Each forecast mode is a small frozen class registered by the name ``DeepCacheConfig.forecast``
holds, as schedules are (``dcfx.schedule``). A mode says how many full steps' features a
generation keeps (``anchors``: one buffer for the paper's reuse, two for a first-order
forecast) and, for each shallow step, the coefficient ``c`` with which the shallow graph reads
``f1 + c (f1 - f0)`` (None: read ``f1`` unchanged). Nothing else in dcfx switches on a mode's
name: the runtime asks the object (``config.forecast_spec``).

The positions are the steps' places on the sampler's time axis (their timesteps), not call
counts, so uneven spacing is handled; the graph that forms the forecast is
``dcfx.passes.forecast``.

Example:
    >>> spec = get_forecast("linear")()
    >>> spec.coefficient(position=700.0, s0=900.0, s1=800.0)
    1.0
    >>> spec.coefficient(position=760.0, s0=900.0, s1=800.0)
    0.4
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar, TypeVar

from dcfx.registry import Registry


@dataclasses.dataclass(frozen=True)
class Forecast(abc.ABC):
    """A forecast mode: how a shallow step's feature comes from the kept full-step features."""

    name: ClassVar[str] = ""
    anchors: ClassVar[int] = 1  # how many full steps' features a generation keeps

    @abc.abstractmethod
    def coefficient(self, position: float, s0: float, s1: float) -> float | None:
        """Returns ``c`` for a shallow step at ``position`` with anchors at ``s0`` (older) and ``s1``.

        None means the step reads the newest feature unchanged. Called only when the
        generation holds ``anchors`` features.
        """

    @property
    def forecasts(self) -> bool:
        """Whether shallow steps may read something other than the newest feature."""
        return self.anchors > 1


_FORECASTS: Registry[type[Forecast]] = Registry("forecast")
_F = TypeVar("_F", bound=type[Forecast])


def register_forecast(name: str) -> Callable[[_F], _F]:
    """Returns a class decorator that registers a ``Forecast`` subclass as mode ``name``."""

    def register(cls: _F) -> _F:
        if cls.anchors not in (1, 2):
            raise ValueError(f"forecast {name!r} keeps {cls.anchors} features; the runtime keeps one or two")
        cls.name = name
        _FORECASTS.add(name, cls)
        return cls

    return register


def available_forecasts() -> list[str]:
    """Returns the registered forecast mode names."""
    return _FORECASTS.names()


def get_forecast(name: str) -> type[Forecast]:
    """Returns the forecast class registered as ``name`` (ValueError listing the others if unknown)."""
    return _FORECASTS.get(name)


@register_forecast("none")
@dataclasses.dataclass(frozen=True)
class Reuse(Forecast):
    """The paper's reuse: every shallow step reads the feature of the last full step."""

    def coefficient(self, position: float, s0: float, s1: float) -> float | None:  # noqa: D102
        return None


@register_forecast("linear")
@dataclasses.dataclass(frozen=True)
class Linear(Forecast):
    """First order from the last two full steps at distinct positions: ``c = (s - s1) / (s1 - s0)``.

    ``c`` is clamped at 1 (a forecast never reaches further than the anchors' own distance:
    with interval N > 2 the far end of a long gap overshoots otherwise). Two anchors at one
    position (a sampler that repeats a timestep) give plain reuse, never a division by zero.
    """

    anchors: ClassVar[int] = 2

    def coefficient(self, position: float, s0: float, s1: float) -> float | None:  # noqa: D102
        if s1 == s0:
            return None
        return min((position - s1) / (s1 - s0), 1.0)
