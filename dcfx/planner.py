"""One planner for every generation: which step is full, what a shallow step reads, when a cache is stale.

The runtime (a generation per thread or block), the serving engine (many generations per
tick) and the tuner's cost model all ask this module; nothing else re-derives the full-step
rule or switches on a schedule's or forecast mode's name.

``Planner`` turns a ``DeepCacheConfig`` into each generation's ``GenerationPlan``; a generation
plan answers, step by step, from the schedule, the forecast mode and the *anchors* it recorded
(the full steps whose features the generation holds: where they were taken on the sampler's
time axis, and the caller's token for what made them):

- a step is full when the schedule says so, when the generation holds no feature, or when its
  feature was made by other graphs or for other inputs (the caller's ``source`` token, compared
  with ``==``: the runtime passes its graph pair and input signature, the engine its epoch);
- a shallow step reads the newest feature, or, with a forecast mode that keeps two features of
  one source, ``f1 + c (f1 - f0)`` with the mode's coefficient ``c``;
- a full step at a new position turns the newest anchor into the previous one (the caller
  writes the new feature to its other buffer); at the newest anchor's own position it
  replaces it (a sampler that repeats a timestep).

Example:
    >>> planner = Planner(DeepCacheConfig(branch=0, interval=3, forecast="linear"))
    >>> plan = planner.start(num_steps=6)
    >>> d = plan.decide(0, position=900.0, source="graphs")
    >>> d.full, plan.record_full(d, 900.0, "graphs", payload="buffer A")
    (True, [])
    >>> plan.decide(1, position=800.0, source="graphs")
    Decision(full=False, rotate=False, coefficient=None)
    >>> planner.full_steps(6)
    [0, 3]
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from dcfx import schedule
from dcfx.config import DeepCacheConfig
from dcfx.forecast import Forecast

logger = logging.getLogger(__name__)

# At most this many step plans (one per generation length, for schedules that depend on it) are kept.
MAX_STEP_PLANS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What one step runs.

    Attributes:
        full: Run the full graph (and keep its feature).
        rotate: Full steps only: the newest feature becomes the previous one, so the new feature
            goes to the other buffer (the forecast reads both).
        coefficient: Shallow steps only: read ``f1 + coefficient (f1 - f0)`` (the forecast
            graph); None reads the newest feature ``f1`` (the shallow graph).
    """

    full: bool
    rotate: bool = False
    coefficient: float | None = None


FULL = Decision(True)
FULL_ROTATE = Decision(True, rotate=True)
SHALLOW = Decision(False)


@dataclasses.dataclass(frozen=True, slots=True)
class Anchor:
    """A full step a generation holds the feature of: where it was taken, what made it, the caller's handle."""

    position: float
    source: Any
    payload: Any


class GenerationPlan:
    """One generation's step decisions and the anchors they rest on (see the module docstring).

    Not thread-safe: a generation's steps run one at a time (the runtime and the engine see to it).
    """

    __slots__ = ("forecast", "newest", "previous", "steps")

    def __init__(self, steps: schedule.StepPlan, forecast: Forecast) -> None:
        self.steps = steps
        self.forecast = forecast
        self.newest: Anchor | None = None
        self.previous: Anchor | None = None

    def decide(self, step: int, position: float, source: Any) -> Decision:
        """Returns what step ``step`` at ``position`` runs, given that the caller's graphs and inputs are ``source``."""
        newest = self.newest
        if newest is None or newest.source != source:
            return FULL
        if self.steps.is_full(step):
            return FULL_ROTATE if self.forecast.forecasts and position != newest.position else FULL
        previous = self.previous
        if previous is not None and previous.source == source:
            coefficient = self.forecast.coefficient(position, previous.position, newest.position)
            if coefficient is not None:
                return Decision(False, coefficient=coefficient)
        return SHALLOW

    def record_full(self, decision: Decision, position: float, source: Any, payload: Any = None) -> list[Any]:
        """Records a full step that ran as ``decision`` said; returns the payloads the plan no longer holds.

        ``payload`` is the caller's handle on the new feature (the runtime's buffer, the
        engine's cache rows). ``begin_full`` and ``end_full`` are the two halves, for a caller
        that frees what the step drops before it runs.
        """
        released = self.begin_full(decision, source)
        self.end_full(position, source, payload)
        return released

    def begin_full(self, decision: Decision, source: Any) -> list[Any]:
        """Starts a full step: returns the payloads it drops (the step reads no cache, so they may be reused now).

        Rotating keeps the newest anchor as the previous one; otherwise the newest goes, and
        the previous with it when it is of another source than this step.
        """
        newest, previous = self.newest, self.previous
        released = []
        if decision.rotate:
            if previous is not None:
                released.append(previous.payload)
            self.previous = newest
        else:
            if newest is not None:
                released.append(newest.payload)
            if previous is not None and (newest is None or newest.source != source):
                released.append(previous.payload)
                self.previous = None
        self.newest = None  # until the step has run: a step that fails leaves no feature
        return released

    def end_full(self, position: float, source: Any, payload: Any) -> None:
        """Ends a full step: its feature (``payload``, taken at ``position`` by ``source``) is the newest anchor."""
        self.newest = Anchor(position, source, payload)

    def drop(self) -> list[Any]:
        """Forgets every anchor (a step failed, the generation was reset); returns their payloads."""
        released = [a.payload for a in (self.newest, self.previous) if a is not None]
        self.newest = self.previous = None
        return released

    def next_full(self, step: int, num_steps: int) -> int | None:
        """Returns the first step from ``step`` on that the schedule makes full (None: none before ``num_steps``).

        The steps a stale cache makes full are not foreseen: for planning ahead (the engine's
        admission), not for deciding a step.
        """
        return next((s for s in range(step, num_steps) if self.steps.is_full(s)), None)


class Planner:
    """Makes the plans of a ``DeepCacheConfig``'s generations; plans of a step count are made once.

    Thread-safe: the runtime's generations in several threads and the engine share one.
    """

    def __init__(self, config: DeepCacheConfig) -> None:
        self.config = config
        self.forecast = config.forecast_spec
        self._plans: dict[int | None, schedule.StepPlan] = {}
        self._lock = threading.Lock()

    def start(self, num_steps: int | None) -> GenerationPlan:
        """Returns the plan of a new generation of ``num_steps`` steps (None: unknown).

        A generation a non-uniform schedule has no solution for (shorter than it allows:
        img2img, a reset part-way; or of unknown length) runs the uniform 1:N schedule, said
        once per length.
        """
        return GenerationPlan(self._steps(num_steps), self.forecast)

    def full_steps(self, num_steps: int) -> list[int]:
        """Returns the full steps of an undisturbed ``num_steps``-step generation (no stale cache).

        Raises:
            ValueError: the schedule has no solution for ``num_steps`` (no fallback: the tuner
                counts such a candidate as infeasible).
        """
        plan = GenerationPlan(schedule.plan(self.config, num_steps), self.forecast)
        full = []
        for step in range(num_steps):
            decision = plan.decide(step, float(-step), None)
            if decision.full:
                plan.record_full(decision, float(-step), None)
                full.append(step)
        return full

    def _steps(self, num_steps: int | None) -> schedule.StepPlan:
        if not self.config.schedule_spec.per_step_count:
            num_steps = None  # one plan serves every length
        plan = self._plans.get(num_steps)
        if plan is None:
            plan = self._make(num_steps)
            with self._lock:
                if len(self._plans) >= MAX_STEP_PLANS:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[num_steps] = plan
        return plan

    def _make(self, num_steps: int | None) -> schedule.StepPlan:
        cfg = self.config
        try:
            return schedule.plan(cfg, num_steps)
        except ValueError as e:
            if not cfg.schedule_spec.per_step_count:
                raise
            # A generation shorter than the schedule allows, or of a length no scheduler told
            # (calls counted by timestep): refusing would stop a pipeline half-way.
            length = "of unknown length" if num_steps is None else f"{num_steps}-step"
            logger.warning("dcfx: %s. This %s generation runs the uniform 1:%d schedule", e, length, cfg.interval)
            return schedule.plan(DeepCacheConfig(branch=cfg.branch, interval=cfg.interval), num_steps)
