"""DeepCacheConfig: what to cache (a U-Net's branch, a transformer's block range) and when (schedule)."""

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
    """DeepCache settings: where the model is cut (what is cached) and the full-step schedule.

    A U-Net is cut at a skip ``branch``; a diffusion transformer at a block range (``first``,
    ``last``: cache-dit's DBCache F/B). A config names one or the other, never both.

    Attributes:
        branch: U-Nets: skip branch id. 0 caches the input of the last up layer (the
            shallowest and cheapest shallow graph); ``dcfx.branches(unet)`` lists the valid
            ids of a model. Default 0 when ``first`` and ``last`` are not given.
        first: Transformers: how many blocks run first on every step (default 1 when ``last``
            is given).
        last: Transformers: how many blocks run last on every step (default 0 when ``first``
            is given). The blocks between are replaced on cached steps by the residual they
            added at the last full step.
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

    branch: int | None = None
    interval: int = 3
    schedule: ScheduleName = "uniform"
    center: int | None = None
    power: float | None = None
    steps: int | None = None
    full_steps: tuple[int, ...] | None = None
    start: int | None = None
    stop: int | None = None
    forecast: str = "none"
    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_forecast_spec", get_forecast(self.forecast)())
        if self.first is None and self.last is None:
            object.__setattr__(self, "_branch_given", self.branch is not None)
            object.__setattr__(self, "branch", 0 if self.branch is None else self.branch)
            check_int("branch", self.branch, 0)
        else:
            if self.branch is not None:
                raise ValueError(
                    f"branch={self.branch} and first=/last= given together: branch= cuts a U-Net at a skip branch, "
                    "first= and last= cut a diffusion transformer at a block range; give one or the other"
                )
            object.__setattr__(self, "_branch_given", False)
            object.__setattr__(self, "first", 1 if self.first is None else self.first)
            object.__setattr__(self, "last", 0 if self.last is None else self.last)
            check_int("first", self.first, 0)
            check_int("last", self.last, 0)
        check_int("interval", self.interval, 1)
        spec = schedule_from_fields(self.schedule, self.interval, {f: getattr(self, f) for f in schedule_fields()})
        for name, value in spec.config_fields().items():
            object.__setattr__(self, name, value)  # defaults filled in, values normalised
        object.__setattr__(self, "_schedule_spec", spec)

    @property
    def blocks(self) -> tuple[int, int] | None:
        """A transformer's cut ``(first, last)``; None for a U-Net's config (``branch``)."""
        return None if self.first is None else (self.first, int(self.last or 0))

    @property
    def cut(self) -> int | tuple[int, int]:
        """Where the graphs are cut: the branch id, or ``(first, last)``."""
        blocks = self.blocks
        return self.branch if blocks is None else blocks  # type: ignore[return-value]

    def for_transformer(self) -> DeepCacheConfig:
        """Returns this config for a transformer: a default branch becomes the default block range.

        Raises:
            ValueError: the config names a ``branch`` (a U-Net's knob).
        """
        if self.first is not None:
            return self
        if self._branch_given:  # type: ignore[attr-defined]
            raise ValueError(
                f"branch={self.branch} cuts a U-Net at a skip branch; a diffusion transformer is cut by first= and "
                "last= (the blocks that run every step), e.g. first=1, last=0"
            )
        return dataclasses.replace(self, branch=None, first=1, last=0)

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
            if f.name in ("interval", "schedule") or (value is not None and f.name != "forecast"):
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
