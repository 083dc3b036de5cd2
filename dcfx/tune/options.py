"""What ``tune`` searches and how it measures: two frozen settings, checked before anything runs.

``tune`` takes them whole (``space=SearchSpace(...)``, ``measure=MeasureSettings(...)``) or as
the flat keywords it always took (``steps=50, batch=2``), which fill in the same fields; either
way every setting is checked here, in ``__post_init__``. Only what needs the model (that it
loads, that the branches exist) is checked once it is loaded.

Example:
    >>> space = SearchSpace(steps=25, speedup=2.5, intervals=(2, 3, 4), forecasts=("linear",))
    >>> result = dcfx.tune("digits", space=space, measure=MeasureSettings(batch=2, seeds=4))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from dcfx.backends import get_backend
from dcfx.tune.cost import SEARCHABLE_SCHEDULES, check_forecasts, check_schedules, check_step_counts
from dcfx.tune.goal import GOALS, Goal
from dcfx.tune.measure import Rounds
from dcfx.tune.workload import SCHEDULERS


class TuneSettingsError(ValueError):
    """A ``tune`` setting that cannot be searched, found before anything is measured."""


@contextlib.contextmanager
def settings_errors() -> Iterator[None]:
    """Re-raises a ValueError inside as a TuneSettingsError (the one error ``dcfx tune`` reports plainly)."""
    try:
        yield
    except TuneSettingsError:
        raise
    except ValueError as e:
        raise TuneSettingsError(str(e)) from e


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class SearchSpace:
    """What ``tune`` searches: the goal, the no-cache reference, and the configurations it considers.

    Attributes:
        latency: Goal: seconds per generation at most; the best quality within it is chosen.
        speedup: Goal: at least this speedup over no cache; the best quality is chosen.
        quality: Goal: PSNR (dB) against no cache at least; the lowest latency is chosen.
        steps: Denoising steps of the no-cache reference: the quality of every candidate is its
            PSNR against the reference's images, and speedups are over its latency.
        branches: U-Nets: branch ids to consider (default: every branch of the model).
        first: Diffusion transformers: values of ``first`` (blocks run first on every step) to
            combine with each of ``last`` (default: 1, 2, 4, ... below the block count).
        last: Diffusion transformers: values of ``last`` (blocks run last on every step)
            (default: 0, 1, 2, 4, ...). Pairs that leave no block to cache are skipped; see
            ``dcfx.tune.cuts``.
        intervals: Values of N to consider.
        schedules: "uniform" and/or "non-uniform".
        forecasts: Forecast modes (``dcfx.forecast.available_forecasts()``: "none", the paper's
            reuse, and "linear"); each branch x interval x schedule is a candidate in each.
        step_counts: Step counts k to sample with, each in [2, ``steps``] (default: ``steps``
            only). At each k fewer than ``steps`` the candidates are no cache at k steps and
            every cached configuration at k steps.
        center: The non-uniform schedule's centre at ``steps`` (default: 30% of the steps, as the
            paper's 15 of 50); scaled to each step count.
        power: The non-uniform schedule's power.
        min_speedup: Candidates whose FLOP-ideal speedup is below this are pruned.

    Raises:
        TuneSettingsError: (a ValueError) several goals, or a goal, step count, interval,
            schedule or forecast mode that cannot be searched; ``branches`` together with
            ``first``/``last``.
    """

    latency: float | None = None
    speedup: float | None = None
    quality: float | None = None
    steps: int = 50
    branches: Sequence[int] | None = None
    first: Sequence[int] | None = None
    last: Sequence[int] | None = None
    intervals: Sequence[int] = tuple(range(2, 11))
    schedules: Sequence[str] = SEARCHABLE_SCHEDULES
    forecasts: Sequence[str] = ("none", "linear")
    step_counts: Sequence[int] | None = None
    center: int | None = None
    power: float = 1.4
    min_speedup: float = 1.1

    def __post_init__(self) -> None:
        with settings_errors():
            given = [kind for kind in GOALS if getattr(self, kind) is not None]
            if len(given) > 1:
                raise ValueError(f"give one goal (latency=, speedup= or quality=), got {given}")
            for kind in given:
                Goal(kind, getattr(self, kind))  # checks the value
            _check_int("steps", self.steps, 2)
            # Normalised to tuples (an iterator is read once), so that a space compares, hashes and
            # prints as what is searched.
            object.__setattr__(self, "intervals", tuple(self.intervals))
            object.__setattr__(self, "schedules", tuple(self.schedules))
            check_schedules(self.schedules)
            bad_n = [n for n in self.intervals if isinstance(n, bool) or not isinstance(n, int) or n < 2]
            if bad_n or not self.intervals:
                raise ValueError(f"intervals must be ints >= 2 (1 is no cache), got {list(self.intervals)}")
            object.__setattr__(self, "forecasts", check_forecasts(self.forecasts))
            if self.step_counts is not None:
                object.__setattr__(self, "step_counts", check_step_counts(self.step_counts, self.steps))
            if self.branches is not None and (self.first is not None or self.last is not None):
                raise ValueError(
                    f"branches={list(self.branches)} and first=/last= given together: branches= are a U-Net's skip "
                    "branches, first= and last= a diffusion transformer's block ranges; give one or the other"
                )
            for name in ("branches", "first", "last"):
                values = getattr(self, name)
                if values is None:
                    continue
                values = tuple(values)
                if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                    raise ValueError(f"{name} must be ints >= 0, got {list(values)}")
                object.__setattr__(self, name, values)

    @property
    def goal(self) -> Goal | None:
        """The goal the choice is made for (None: measure the frontier, choose nothing)."""
        for kind in GOALS:
            value = getattr(self, kind)
            if value is not None:
                return Goal(kind, value)
        return None

    @property
    def sampling_steps(self) -> tuple[int, ...]:
        """The step counts sampled with, largest first: ``step_counts``, or the reference's alone."""
        return (self.steps,) if self.step_counts is None else tuple(self.step_counts)

    @property
    def schedule_center(self) -> int:
        """The non-uniform schedule's centre at ``steps``: ``center``, or 30% of the steps."""
        return round(0.3 * self.steps) if self.center is None else self.center


@dataclass(frozen=True)
class MeasureSettings:
    """How ``tune`` measures: the sampler, the batch and seeds it generates, and when timing stops.

    Attributes:
        scheduler: "ddim", "dpm" or "euler" (for a model given by name or folder).
        batch: Samples per generation (the batch the latency is measured at).
        size: Latent height and width (default: the model's ``sample_size``).
        backend: A registered backend ("eager", "inductor").
        seeds: K, the calibration seeds (one sample each: a class label or a prompt embedding), a
            multiple of ``batch``.
        repeats: Timed generations per candidate at least (interleaved rounds; the latency is
            their median).
        max_rounds: Timed generations per candidate at most, whether its spread settled or not.
        tolerance: Rounds go on until each latency's spread (the half-width of its median's 90%
            confidence interval, relative to it; see ``dcfx.tune.measure``) is at most this, or
            ``max_rounds`` have run.

    Raises:
        TuneSettingsError: (a ValueError) an unknown scheduler or backend, bad sizes or rounds.
    """

    scheduler: str = "ddim"
    batch: int = 10
    size: int | None = None
    backend: str = "eager"
    seeds: int = 20
    repeats: int = 3
    max_rounds: int = 10
    tolerance: float = 0.03

    def __post_init__(self) -> None:
        with settings_errors():
            if self.scheduler not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
            for name, low in (("batch", 1), ("seeds", 1), ("repeats", 1)):
                _check_int(name, getattr(self, name), low)
            if isinstance(self.max_rounds, int) and self.max_rounds < self.repeats:
                raise ValueError(
                    f"max_rounds ({self.max_rounds}) must be >= repeats ({self.repeats}), the least timed generations"
                )
            Rounds(self.repeats, self.max_rounds, self.tolerance)  # checks max_rounds and tolerance
            if self.seeds % self.batch:
                raise ValueError(
                    f"seeds ({self.seeds}) must be a multiple of batch ({self.batch}): "
                    "every generation runs a full batch"
                )
            get_backend(self.backend)

    @property
    def rounds(self) -> Rounds:
        """When interleaved timing stops."""
        return Rounds(min_rounds=self.repeats, max_rounds=self.max_rounds, tolerance=self.tolerance)


SPACE_FIELDS = tuple(f.name for f in fields(SearchSpace))
MEASURE_FIELDS = tuple(f.name for f in fields(MeasureSettings))


def gather(
    space: SearchSpace | None, measure: MeasureSettings | None, settings: Mapping[str, Any]
) -> tuple[SearchSpace, MeasureSettings]:
    """Returns ``space`` and ``measure`` (default: the defaults) with the flat ``settings`` filled in.

    Raises:
        TypeError: a setting that is a field of neither, naming the valid ones.
        TuneSettingsError: a bad value (see the two classes).
    """
    unknown = [k for k in settings if k not in SPACE_FIELDS and k not in MEASURE_FIELDS]
    if unknown:
        raise TypeError(
            f"tune() got unknown settings {unknown}; valid: {', '.join(SPACE_FIELDS)} (SearchSpace), "
            f"{', '.join(MEASURE_FIELDS)} (MeasureSettings)"
        )
    space_given = {k: v for k, v in settings.items() if k in SPACE_FIELDS}
    space = replace(space, **space_given) if space is not None else SearchSpace(**space_given)
    measure_given = {k: v for k, v in settings.items() if k in MEASURE_FIELDS}
    measure = replace(measure, **measure_given) if measure is not None else MeasureSettings(**measure_given)
    return space, measure
