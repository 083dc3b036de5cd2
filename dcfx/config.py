"""DeepCacheConfig: what to cache (branch) and when to refresh it (schedule)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

SCHEDULES = ("uniform", "non-uniform", "explicit", "window")
FORECASTS = ("none", "linear")
# The non-uniform search lowers the power in steps of 0.02 towards 1: a bound keeps it short.
MAX_POWER = 10.0

ScheduleName = Literal["uniform", "non-uniform", "explicit", "window"]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_center(center: int, steps: int) -> None:
    """Raises ValueError unless the non-uniform ``center`` is a step of a ``steps``-step generation."""
    if center >= steps:
        raise ValueError(
            f"non-uniform center {center} is outside the {steps} steps of the generation (valid: 0..{steps - 1}); "
            f"the paper centres its schedule at about step 15 of 50"
        )


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
        forecast: What a shallow step reads: ``"none"`` (the cached feature, as the paper
            and the reference implementation do) or ``"linear"`` (a first-order forecast from
            the last two full steps at distinct timesteps, ``f1 + c (f1 - f0)`` with
            ``c = (t - t1) / (t1 - t0)`` at most 1; plain reuse until there are two).

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
    forecast: Literal["none", "linear"] = "none"

    def __post_init__(self) -> None:
        if self.forecast not in FORECASTS:
            raise ValueError(f"unknown forecast {self.forecast!r}; valid: {', '.join(FORECASTS)}")
        _check_int("branch", self.branch, 0)
        _check_int("interval", self.interval, 1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        used = {
            "non-uniform": {"center", "power", "steps"},
            "explicit": {"full_steps"},
            "window": {"start", "stop"},
            "uniform": set(),
        }[self.schedule]
        for name in ("center", "power", "steps", "full_steps", "start", "stop"):
            if getattr(self, name) is not None and name not in used:
                raise ValueError(
                    f"{name}= does not apply to schedule {self.schedule!r}; "
                    f"it takes {', '.join(sorted(used)) or 'no extra fields'}"
                )
        if self.schedule == "non-uniform":
            self._check_non_uniform()
        elif self.schedule == "explicit":
            self._check_explicit()
        elif self.schedule == "window":
            self._check_window()

    def _check_non_uniform(self) -> None:
        if self.center is None:
            object.__setattr__(self, "center", 15)
        if self.power is None:
            object.__setattr__(self, "power", 1.4)
        _check_int("center", self.center, 0)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)):
            raise TypeError(f"power must be a number > 1, got {self.power!r}")
        if not 1 < self.power <= MAX_POWER:
            raise ValueError(
                f"power must be > 1 and <= {MAX_POWER:g} (the reference starts at 1.2-1.5 and lowers it towards 1), "
                f"got {self.power}"
            )
        object.__setattr__(self, "power", float(self.power))
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
            check_center(self.center, self.steps)

    def _check_explicit(self) -> None:
        if self.full_steps is None or isinstance(self.full_steps, (str, bytes)):
            raise TypeError("schedule='explicit' needs full_steps=, a sequence of step indices")
        if not isinstance(self.full_steps, Sequence):
            raise TypeError(f"full_steps must be a sequence of ints, got {type(self.full_steps).__name__}")
        for i in self.full_steps:
            _check_int("each of full_steps", i, 0)
        object.__setattr__(self, "full_steps", tuple(sorted(set(self.full_steps))))

    def _check_window(self) -> None:
        if self.start is None:
            object.__setattr__(self, "start", 0)
        _check_int("start", self.start, 0)
        if self.stop is not None:
            _check_int("stop", self.stop, 1)
            if self.stop <= self.start:
                raise ValueError(f"window start must be < stop, got start={self.start}, stop={self.stop}")

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
            if f.name in ("branch", "interval", "schedule") or (value is not None and value != "none"):
                out[f.name] = list(value) if isinstance(value, tuple) else value
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
