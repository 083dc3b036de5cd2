"""The (interval, forecast) settings a serving engine offers its requests, on one graph pair.

All settings cut where the runtime does, so one graph pair serves them; each has its own
planner (``dcfx.planner``). The runtime's own setting is always offered and plans with the
runtime's planner, so a ``reschedule`` of the runtime reaches its requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dcfx.config import DeepCacheConfig
from dcfx.planner import GenerationPlan, Planner

Setting = tuple[int, str]


class Settings:
    """What requests may ask for: ``choices`` (the first is the default) and the runtime's own.

    Raises:
        TypeError, ValueError: a choice that is not a ``DeepCacheConfig``, cuts elsewhere, or
            forecasts while the runtime's graphs have no forecast graph.
    """

    def __init__(self, runtime: Any, choices: Iterable[DeepCacheConfig] = ()) -> None:
        self.runtime = runtime
        own = runtime.deepcache_config
        self._planners: dict[Setting, Planner] = {}
        for choice in choices:
            if not isinstance(choice, DeepCacheConfig):
                raise TypeError(f"choices must be DeepCacheConfigs, got {type(choice).__name__}")
            if choice.cut != own.cut:
                raise ValueError(
                    f"a choice must cut where the runtime does ({own.cut}), got {choice.cut}: "
                    "only interval and forecast may differ"
                )
            if choice.forecast_spec.forecasts and not own.forecast_spec.forecasts:
                raise ValueError(
                    f"the choice forecast={choice.forecast!r} needs the forecast graph: compile the runtime with a "
                    "forecasting config (any choice that forecasts)"
                )
            self._planners[(choice.interval, choice.forecast)] = Planner(choice)

    def own(self) -> Setting:
        """Returns the runtime's own setting (it follows ``reschedule``)."""
        config = self.runtime.deepcache_config
        return config.interval, config.forecast

    def choices(self) -> list[Setting]:
        """Returns the settings offered, the default first."""
        return list(dict.fromkeys([*self._planners, self.own()]))

    def resolve(self, interval: int | None, forecast: str | None) -> Setting:
        """Returns the setting of a request naming these (None: the default's); ValueError when not offered."""
        default = self.choices()[0]
        setting = (default[0] if interval is None else interval, default[1] if forecast is None else forecast)
        if setting not in self.choices():
            offered = ", ".join(f"interval {i} forecast {f!r}" for i, f in self.choices())
            raise ValueError(
                f"this server does not offer interval {setting[0]} with forecast {setting[1]!r}; it offers: {offered}"
            )
        return setting

    def start(self, interval: int | None, forecast: str | None, steps: int) -> tuple[Setting, GenerationPlan]:
        """Returns a new generation's setting and plan."""
        setting = self.resolve(interval, forecast)
        if setting == self.own():
            return setting, self.runtime.planner.start(steps)
        return setting, self._planners[setting].start(steps)
