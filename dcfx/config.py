"""DeepCacheConfig: what to cache (branch) and when to refresh it (schedule)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from dcfx.forecast import Forecast, get_forecast
from dcfx.schedule import Schedule, schedule_fields, schedule_from_fields
from dcfx.util import check_int

ScheduleName = Literal["uniform", "non-uniform", "explicit", "window"]


@dataclasses.dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache settings: the skip branch whose input is cached and the full-step schedule.

    Attributes:
        branch: Skip branch id. 0 caches the input of the last up layer (the shallowest and
            cheapest shallow graph); ``dcfx.branches(unet)`` lists the valid ids of a model.
        interval: N of the 1:N schedule: one full step, then N - 1 shallow ones (on average for
            the non-uniform schedule). 1 disables caching.
        schedule: ``"uniform"`` (step i is full when i % N == 0), ``"non-uniform"`` (the
            paper's quadratic schedule around ``center`` with ``power``), ``"explicit"`` (the
            steps listed in ``full_steps``) or ``"window"`` (uniform 1:N inside
            ``[start, stop)``, every step outside is full).
        center: Non-uniform only: the step around which full steps are densest.
        power: Non-uniform only: the initial power (> 1, at most 10) of the schedule; lowered in steps of
            0.02, as the reference does, until the requested number of full steps appears.
        steps: Non-uniform only: the number of denoising steps, when no scheduler tells it.
        full_steps: Explicit only: the indices of the full steps.
        start: Window only: every step before ``start`` is full.
        stop: Window only: every step from ``stop`` on is full (None: no tail).
        forecast: What a shallow step reads (``dcfx.forecast``): ``"none"`` (the cached
            feature, as the paper and the reference implementation do) or ``"linear"`` (a
            first-order forecast from the last two full steps at distinct timesteps,
            ``f1 + c (f1 - f0)`` with ``c = (t - t1) / (t1 - t0)`` at most 1; plain reuse until
            there are two).

    Example:
        >>> DeepCacheConfig(branch=2, interval=5, schedule="non-uniform", center=15, power=1.4)
        DeepCacheConfig(branch=2, interval=5, schedule='non-uniform', center=15, power=1.4, ...)
    """

    branch: int = 0
    interval: int = 3
    schedule: ScheduleName = "uniform"
    center: int | None = None
    power: float | None = None
    steps: int | None = None
    full_steps: tuple[int, ...] | None = None
    start: int | None = None
    stop: int | None = None
    forecast: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_forecast_spec", get_forecast(self.forecast)())
        check_int("branch", self.branch, 0)
        check_int("interval", self.interval, 1)
        spec = schedule_from_fields(self.schedule, self.interval, {f: getattr(self, f) for f in schedule_fields()})
        for name, value in spec.config_fields().items():
            object.__setattr__(self, name, value)  # defaults filled in, values normalised
        object.__setattr__(self, "_schedule_spec", spec)

    @property
    def schedule_spec(self) -> Schedule:
        """The schedule as a typed object (``dcfx.schedule.Uniform``, ``NonUniform``, ...): its plan, its needs."""
        return self._schedule_spec  # type: ignore[attr-defined]

    @property
    def forecast_spec(self) -> Forecast:
        """The forecast mode as a typed object (``dcfx.forecast.Reuse``, ``Linear``): its anchors, its coefficient."""
        return self._forecast_spec  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepCacheConfig:
        """Returns the config that ``to_dict`` wrote; unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown DeepCacheConfig field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields that differ from their defaults, JSON-ready."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("branch", "interval", "schedule") or (value is not None and f.name != "forecast"):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.forecast != "none":
            out["forecast"] = self.forecast  # absent: the paper's reuse (and what older files hold)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeepCacheConfig:
        """Returns the config stored as JSON at ``path`` (as ``save`` writes it)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of DeepCacheConfig fields")
        return cls.from_dict(data.get("deepcache", data))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the config as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"deepcache": self.to_dict()}, f, indent=2)
            f.write("\n")
