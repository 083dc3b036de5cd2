"""One generation's state and its transitions: where it is in its steps, its plan, its cache buffers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from dcfx.backends import CompiledPair
from dcfx.planner import Decision, GenerationPlan, Planner
from dcfx.scalars import scalar
from dcfx.steps import StepTracker


class Generation:
    """One generation's state: where it is in its steps, its plan, and its cache buffers.

    A runtime gives each thread its own (``DeepCacheUNet.generation()`` gives a block of code
    one of its own): two generations never share a cache. The cache lives in a buffer that
    the generation keeps while the feature's layout stays the same, so its address is fixed
    from one generation to the next (what CUDA graphs and engine bindings need).

    Which step is full and what a shallow step reads is the plan's to say
    (``dcfx.planner.GenerationPlan``, whose anchors hold these buffers). With forecasting the
    generation keeps the features of its last two full steps at distinct positions in two
    buffers that trade roles on each full step: no copy, two fixed addresses.

    The runtime drives a call through ``enter``/``leave`` (one call at a time), ``advance``
    (the step index, a new plan at a new generation; ``restore`` undoes it for a refused
    call) and ``run``.

    A pipeline that calls the model once per guidance branch (Wan) makes several calls per
    step (``StepTracker.repeat``): each call of a step has a lane of its own (its plan and
    buffers), as each branch has its own features; every lane follows the same schedule.
    """

    __slots__ = ("_busy", "_epoch", "_lane", "_lanes", "tracker")

    def __init__(self, scheduler: Any, epoch: int, timestep_divisor: float = 1.0) -> None:
        self.tracker = StepTracker(scheduler, timestep_divisor)
        self._lanes = [_Lane()]
        self._lane = self._lanes[0]  # the lane of the call in progress
        self._busy = threading.Lock()
        self._epoch = epoch

    @property
    def plan(self) -> GenerationPlan | None:
        """The plan of the current call's lane (None before the first step)."""
        return self._lane.plan

    @plan.setter
    def plan(self, plan: GenerationPlan | None) -> None:
        self._lane.plan = plan

    @property
    def buffers(self) -> list[torch.Tensor | None]:
        """The current lane's two feature buffers."""
        return self._lane.buffers

    @property
    def _slot(self) -> int:
        return self._lane.slot

    @_slot.setter
    def _slot(self, slot: int) -> None:
        self._lane.slot = slot

    @property
    def buffer(self) -> torch.Tensor | None:
        """The buffer of the latest cache feature (None before any full step)."""
        return self.buffers[self._slot]

    @property
    def cache(self) -> torch.Tensor | None:
        """The buffer holding the newest valid cache feature (None when there is none)."""
        return None if self.plan is None or self.plan.newest is None else self.plan.newest.payload

    @property
    def previous(self) -> torch.Tensor | None:
        """Forecasting: the buffer holding the full step's feature before the newest (None when there is none)."""
        return None if self.plan is None or self.plan.previous is None else self.plan.previous.payload

    def reset(self) -> None:
        """Starts a new generation: forgets the step count and invalidates the cache."""
        self.tracker.reset()
        for lane in self._lanes:
            if lane.plan is not None:
                lane.plan.drop()
        self._lane = self._lanes[0]

    def enter(self) -> None:
        """Takes this generation for one call; RuntimeError when another thread is inside one (``leave`` after)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this dcfx generation is inside a call in another thread: a generation's steps run one at a time. "
                "Threads get a generation each by default; share a runtime.generation() block only within one thread"
            )

    def leave(self) -> None:
        """Lets go of this generation after a call."""
        self._busy.release()

    def advance(
        self, epoch: int, timestep: Any, value: float | None, planner: Planner, on_new: Callable[[], None]
    ) -> tuple[int, tuple[Any, GenerationPlan | None]]:
        """Moves to the call's step; returns its index and what ``restore`` puts back.

        A runtime that moved on (``epoch``: rescheduled, graphs cleared) starts this generation
        anew; a new generation calls ``on_new`` (the model check), then plans its steps. If
        that raises, nothing changed.
        """
        if self._epoch != epoch:
            self.reset()
            self._epoch = epoch
        saved = (self.tracker.save(), self._lane, [lane.plan for lane in self._lanes])
        try:
            index, num_steps, new = self.tracker.advance(timestep, value)
            repeat = self.tracker.repeat
            while len(self._lanes) <= repeat:
                self._lanes.append(_Lane())
            self._lane = self._lanes[repeat]
            if new:
                on_new()
                for lane in self._lanes[1:]:
                    if lane.plan is not None:
                        lane.plan.drop()
                        lane.plan = None
                self.plan = planner.start(num_steps)
            elif repeat and self.plan is None:
                self.plan = planner.start(num_steps)  # a step's next call, met for the first time
        except BaseException:
            self.restore(saved)
            raise
        return index, saved

    def restore(self, saved: tuple[Any, ...]) -> None:
        """Puts back the step count and plans of before ``advance``.

        A refused call (bad input, a build that failed) ran no graph: the generation in
        progress goes on.
        """
        tracker, lane, plans = saved
        self.tracker.restore(tracker)
        del self._lanes[len(plans) :]
        for each, plan in zip(self._lanes, plans, strict=True):
            each.plan = plan
        self._lane = lane

    def position(self, index: int, timestep: Any, value: float | None) -> float:
        """The step's place on the sampler's time axis (what a forecast moves the feature by)."""
        position = self.tracker.position(index)
        if position is None:
            position = value if value is not None else float(timestep[0])
        return position

    def run(
        self,
        decision: Decision,
        pair: CompiledPair,
        source: Any,
        tensors: tuple[torch.Tensor, ...],
        position: float,
    ) -> torch.Tensor:
        """Runs the step ``decision`` gives with ``pair``; a full step's feature goes into this generation's buffer.

        Whatever fails (a graph, out of memory, an interrupt), no cache of this generation is
        trusted again: the next call starts a new one.
        """
        try:
            if torch.is_grad_enabled():
                with torch.no_grad():
                    return self._run(decision, pair, source, tensors, position)
            return self._run(decision, pair, source, tensors, position)
        except BaseException:
            self.reset()
            raise

    def _run(
        self, decision: Decision, pair: CompiledPair, source: Any, tensors: tuple[torch.Tensor, ...], position: float
    ) -> torch.Tensor:
        plan = self.plan
        assert plan is not None
        if decision.full:
            if decision.rotate:
                self._slot ^= 1  # the newest feature stays, as the previous one; the new one goes to the other buffer
            sample, cache = pair.run_full(tensors, self.buffer_for)
            plan.record_full(decision, position, source, cache)
            return sample
        cache = plan.newest.payload
        if decision.coefficient is not None:
            coefficient = scalar(decision.coefficient, torch.float32, cache.device)
            return pair.run_forecast(tensors, cache, plan.previous.payload, coefficient)
        return pair.run_shallow(tensors, cache)

    def buffer_for(
        self, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Returns this generation's feature buffer for the layout, allocated when the layout changes."""
        # The buffer keeps the feature's strides: some features come out channels-last, and a
        # shallow graph fed another layout takes other kernels (1e-5 off over ten steps).
        buffer = self.buffers[self._slot]
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.stride() != tuple(stride)
            or buffer.dtype != dtype
            or buffer.device != device
        ):
            buffer = self.buffers[self._slot] = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return buffer


class _Lane:
    """The plan and the two feature buffers of one call of each step (one guidance branch)."""

    __slots__ = ("buffers", "plan", "slot")

    def __init__(self) -> None:
        self.plan: GenerationPlan | None = None
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.slot = 0  # the buffer the next full step writes
