"""Which denoising steps are full: uniform, non-uniform, explicit and window schedules.

A step index counts the U-Net calls of one generation from 0. Step 0 is always full.

Each schedule kind is a small frozen dataclass (``Uniform``, ``NonUniform``, ``Explicit``,
``Window``) that validates its settings in ``__post_init__`` and makes the step plan of a
generation. The kinds sit in a registry keyed by the name ``DeepCacheConfig.schedule`` holds;
the config keeps its flat fields (``center``, ``start``, ...) for its JSON, and each kind names
the ones it reads. Nothing else in dcfx switches on a schedule's name: code asks the schedule
object (``config.schedule_spec``) what it needs.

Example:
    >>> spec = DeepCacheConfig(interval=3, schedule="non-uniform", center=15, steps=20).schedule_spec
    >>> spec
    NonUniform(interval=3, center=15, power=1.4, steps=20)
    >>> [i for i in range(20) if spec.plan(None).is_full(i)]
    [0, 4, 8, 11, 14, 15, 17]
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from dcfx.registry import Registry
from dcfx.util import check_int

# The non-uniform search lowers the power in steps of 0.02 towards 1: a bound keeps it short.
MAX_POWER = 10.0
_NO_POWER = "no power > 1 gives the requested number of full steps"


def check_center(center: int, steps: int) -> None:
    """Raises ValueError unless the non-uniform ``center`` is a step of a ``steps``-step generation."""
    if center >= steps:
        raise ValueError(
            f"non-uniform center {center} is outside the {steps} steps of the generation (valid: 0..{steps - 1}); "
            f"the paper centres its schedule at about step 15 of 50"
        )


def non_uniform_full_steps(steps: int, interval: int, center: int, power: float) -> tuple[list[int], float]:
    """Returns the full steps of the paper's non-uniform 1:N schedule and the power used.

    Reproduces ``sample_from_quad_center`` of the reference implementation (DeepCache 0.1.1)
    exactly, quirks included: ``(-center) ** (1 / power)`` is complex in Python, numpy keeps
    the complex arithmetic, and the int32 cast keeps only the real part. The power drops by
    0.02 until ``ceil(steps / interval)`` unique indices appear.

    Example:
        >>> non_uniform_full_steps(20, 3, center=15, power=1.4)
        ([0, 4, 8, 11, 14, 15, 17], 1.4)

    Raises:
        ValueError: when no power > 1 yields that many full steps.
    """
    if interval == 1:
        return list(range(steps)), power
    n_samples = math.ceil(steps / interval)
    pw = power
    while pw > 1:
        lo = (-center) ** (1 / pw)
        hi = (steps - center) ** (1 / pw)
        x_values = np.linspace(lo, hi, n_samples + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            ints = np.int32(x_values**pw)
        indices = [0] + [int(x) + center for x in np.unique(ints)[1:-1]]
        if len(indices) == n_samples:
            return sorted(indices), pw
        pw -= 0.02
    raise ValueError(
        f"non-uniform schedule: {_NO_POWER} (steps={steps}, interval={interval}, center={center}, "
        f"power={power}); lower the interval, move center towards steps / 2, or use schedule='uniform'"
    )


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The full/shallow decision for every step of one generation.

    ``rule`` is a schedule whose full steps do not depend on the step count: the schedule
    itself, or what a non-uniform schedule resolved to for the generation's count.
    """

    rule: Schedule

    def is_full(self, step: int) -> bool:
        """Returns whether the schedule makes ``step`` a full step."""
        return step == 0 or self.rule.is_full(step)


@dataclasses.dataclass(frozen=True)
class Schedule(abc.ABC):
    """One schedule kind and its settings; validated on construction.

    Subclasses are registered by name (``register_schedule``) and name the ``DeepCacheConfig``
    fields they read besides ``interval`` in ``fields``; every other schedule field must be
    unset. The constructor fills their defaults, so ``config_fields()`` gives the values the
    config stores.

    Attributes:
        interval: N of the 1:N schedule; 1 makes every step full.
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    # Whether the full steps depend on the generation's step count (one plan per count).
    per_step_count: ClassVar[bool] = False

    interval: int

    def __post_init__(self) -> None:
        check_int("interval", self.interval, 1)

    def config_fields(self) -> dict[str, Any]:
        """Returns the ``DeepCacheConfig`` fields this schedule reads, defaults filled in."""
        return {name: getattr(self, name) for name in self.fields}

    def needs_step_count(self) -> bool:
        """Returns whether a plan needs the step count from a scheduler (the schedule carries none)."""
        return False

    def plan(self, num_steps: int | None) -> StepPlan:
        """Returns the step plan of a generation of ``num_steps`` steps (None: unknown).

        Raises:
            ValueError: the schedule needs the step count and has none, or has no solution for it.
        """
        return StepPlan(self)

    @abc.abstractmethod
    def is_full(self, step: int) -> bool:
        """Returns whether the schedule makes ``step`` (> 0) a full step."""


_SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
_S = TypeVar("_S", bound=type[Schedule])


def register_schedule(name: str) -> Callable[[_S], _S]:
    """Returns a class decorator that registers a ``Schedule`` subclass as schedule ``name``."""

    def register(cls: _S) -> _S:
        cls.name = name
        _SCHEDULES.add(name, cls, cls.fields)
        return cls

    return register


def available_schedules() -> list[str]:
    """Returns the registered schedule names."""
    return _SCHEDULES.names()


def get_schedule(name: str) -> type[Schedule]:
    """Returns the schedule class registered as ``name`` (ValueError listing the others if unknown)."""
    return _SCHEDULES.get(name)


def schedule_fields() -> tuple[str, ...]:
    """Returns every ``DeepCacheConfig`` field some schedule reads, besides ``interval``."""
    names: dict[str, None] = {}
    for kind in available_schedules():
        names.update(dict.fromkeys(get_schedule(kind).fields))
    return tuple(names)


def schedule_from_fields(name: str, interval: int, fields: dict[str, Any]) -> Schedule:
    """Returns the schedule ``name`` of ``interval`` from config fields (unset ones None).

    Raises:
        ValueError: unknown name, a field set that the schedule does not read, a bad value.
        TypeError: a value of the wrong type.
    """
    kind = get_schedule(name)
    takes = ", ".join(sorted(kind.fields)) or "no extra fields"
    for field, value in fields.items():
        if value is not None and field not in kind.fields:
            raise ValueError(f"{field}= does not apply to schedule {name!r}; it takes {takes}")
    return kind(interval, **{field: fields.get(field) for field in kind.fields})


@register_schedule("uniform")
@dataclasses.dataclass(frozen=True)
class Uniform(Schedule):
    """Uniform 1:N: step i is full when i % N == 0."""

    def is_full(self, step: int) -> bool:  # noqa: D102
        return step % self.interval == 0


@register_schedule("non-uniform")
@dataclasses.dataclass(frozen=True)
class NonUniform(Schedule):
    """The paper's non-uniform 1:N schedule: full steps densest around ``center``.

    Attributes:
        center: The step around which full steps are densest (default 15, the paper's).
        power: The initial power, > 1 and at most ``MAX_POWER`` (default 1.4), lowered in steps
            of 0.02 as the reference does until the requested number of full steps appears.
        steps: The generation's step count when no scheduler tells it.
    """

    fields: ClassVar[tuple[str, ...]] = ("center", "power", "steps")
    per_step_count: ClassVar[bool] = True

    center: int | None = None
    power: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center is None:
            object.__setattr__(self, "center", 15)
        if self.power is None:
            object.__setattr__(self, "power", 1.4)
        check_int("center", self.center, 0)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)):
            raise TypeError(f"power must be a number > 1, got {self.power!r}")
        if not 1 < self.power <= MAX_POWER:
            raise ValueError(
                f"power must be > 1 and <= {MAX_POWER:g} (the reference starts at 1.2-1.5 and lowers it towards 1), "
                f"got {self.power}"
            )
        object.__setattr__(self, "power", float(self.power))
        if self.steps is not None:
            check_int("steps", self.steps, 1)
            check_center(self.center, self.steps)

    def needs_step_count(self) -> bool:  # noqa: D102
        return self.steps is None

    def plan(self, num_steps: int | None) -> StepPlan:
        """Returns the plan of a ``num_steps``-step generation (None: ``steps``), as explicit full steps.

        Raises:
            ValueError: neither step count is known, ``center`` is not one of the steps, or no
                power gives the requested number of full steps.
        """
        steps = num_steps if num_steps is not None else self.steps
        if steps is None:
            raise ValueError(
                "the non-uniform schedule needs the number of steps: pass scheduler= to "
                "dcfx.compile (or use dcfx.enable(pipe, ...)), or set steps= in DeepCacheConfig"
            )
        assert self.center is not None and self.power is not None  # filled in by __post_init__
        check_center(self.center, steps)
        full, _ = non_uniform_full_steps(steps, self.interval, self.center, self.power)
        return StepPlan(Explicit(self.interval, tuple(full)))

    def is_full(self, step: int) -> bool:
        """Returns whether ``step`` is full in a generation of ``steps`` steps (ValueError without them)."""
        return self.plan(None).is_full(step)


@register_schedule("explicit")
@dataclasses.dataclass(frozen=True)
class Explicit(Schedule):
    """The listed steps are full (and step 0); an interval of 1 still makes every step full.

    Attributes:
        full_steps: The indices of the full steps (stored sorted, without repeats).
    """

    fields: ClassVar[tuple[str, ...]] = ("full_steps",)

    full_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.full_steps is None or isinstance(self.full_steps, (str, bytes)):
            raise TypeError("schedule='explicit' needs full_steps=, a sequence of step indices")
        if not isinstance(self.full_steps, Sequence):
            raise TypeError(f"full_steps must be a sequence of ints, got {type(self.full_steps).__name__}")
        for i in self.full_steps:
            check_int("each of full_steps", i, 0)
        object.__setattr__(self, "full_steps", tuple(sorted(set(self.full_steps))))

    def is_full(self, step: int) -> bool:  # noqa: D102
        return self.interval == 1 or step in (self.full_steps or ())


@register_schedule("window")
@dataclasses.dataclass(frozen=True)
class Window(Schedule):
    """Uniform 1:N inside ``[start, stop)``; every step outside is full.

    Attributes:
        start: Every step before it is full (default 0).
        stop: Every step from it on is full (None: no tail).
    """

    fields: ClassVar[tuple[str, ...]] = ("start", "stop")

    start: int | None = None
    stop: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start is None:
            object.__setattr__(self, "start", 0)
        check_int("start", self.start, 0)
        if self.stop is not None:
            check_int("stop", self.stop, 1)
            if self.stop <= self.start:  # type: ignore[operator]
                raise ValueError(f"window start must be < stop, got start={self.start}, stop={self.stop}")

    def is_full(self, step: int) -> bool:  # noqa: D102
        start = self.start or 0
        if step < start or (self.stop is not None and step >= self.stop):
            return True
        return (step - start) % self.interval == 0


class Scheduled(Protocol):
    """What ``plan`` reads of a config (a ``DeepCacheConfig``): its schedule."""

    @property
    def schedule_spec(self) -> Schedule: ...  # noqa: D102


def plan(config: Scheduled, num_steps: int | None = None) -> StepPlan:
    """Returns the step plan of ``config`` for a generation of ``num_steps`` steps.

    ``num_steps`` may be None except for the non-uniform schedule, which falls back to
    ``config.steps`` and raises ValueError when neither is known, when ``config.center`` is
    not one of the steps, or when no power gives the requested number of full steps.
    """
    return config.schedule_spec.plan(num_steps)


def full_step_indices(config: Scheduled, num_steps: int) -> list[int]:
    """Returns the sorted full-step indices of a ``num_steps``-step generation."""
    p = plan(config, num_steps)
    return [i for i in range(num_steps) if p.is_full(i)]
