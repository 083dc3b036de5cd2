"""Where a U-Net call falls in its generation: the step index, the generation's length, a new start.

``StepTracker`` reads the scheduler that drives the calls; ``PipelineScheduler`` is the
scheduler a pipeline holds *at each call*, so that a runtime bound to a pipeline
(``dcfx.enable(pipe)``) follows ``pipe.scheduler = EulerDiscreteScheduler.from_config(...)``.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Where a U-Net call falls: its step index in the generation, the generation's length (None
# when unknown), and whether it starts a new generation.
Step = tuple[int, int | None, bool]


class PipelineScheduler:
    """The schedulers of the pipelines a runtime is bound to, as they are at each call.

    ``dcfx.enable(pipe)`` binds a runtime to ``pipe``: its calls are placed by
    ``pipe.scheduler``'s timesteps, whatever scheduler the pipeline holds at the time
    (``pipe.scheduler = EulerDiscreteScheduler.from_config(...)`` is followed). A second
    pipeline sharing the runtime (an SDXL refiner made from the base's components) is bound
    with ``dcfx.enable(refiner)`` too; a call then belongs to the pipeline whose scheduler set
    new timesteps (every pipeline call starts so), and its generation starts there.

    It answers every attribute of the first pipeline's scheduler. Pipelines are held weakly
    (a pipeline holds the runtime); once one is gone, its last scheduler answers. A copy
    (``copy.deepcopy``, ``pickle``) is a copy of the first pipeline's scheduler of that moment.

    Example:
        >>> follow = PipelineScheduler(pipe)
        >>> pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        >>> follow.current is pipe.scheduler
        True
    """

    __slots__ = ("__weakref__", "_last", "_pipes")

    def __init__(self, pipe: Any) -> None:
        self._pipes: list[weakref.ref[Any]] = []
        self._last: list[Any] = []
        self.add(pipe)

    def add(self, pipe: Any) -> None:
        """Binds ``pipe`` too (nothing changes if it is bound already)."""
        if not any(ref() is pipe for ref in self._pipes):
            self._pipes.append(weakref.ref(pipe))
            self._last.append(pipe.scheduler)

    def schedulers(self) -> list[Any]:
        """Returns each bound pipeline's scheduler now."""
        for i, ref in enumerate(self._pipes):
            pipe = ref()
            if pipe is not None:
                self._last[i] = pipe.scheduler
        return self._last

    def binds(self, pipe: Any) -> bool:
        """Returns whether ``pipe`` is one of the bound pipelines."""
        return any(ref() is pipe for ref in self._pipes)

    @property
    def current(self) -> Any:
        """The first bound pipeline's scheduler now."""
        return self.schedulers()[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return copy.deepcopy, (self.current,)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.current, memo)

    def __repr__(self) -> str:
        owners = [type(p).__name__ for p in (ref() for ref in self._pipes) if p is not None]
        return f"PipelineScheduler(the schedulers of {', '.join(owners) or 'pipelines no longer alive'})"


class StepTracker:
    """Counts the U-Net calls of each generation and notices when a new one starts.

    With a scheduler, a generation starts when ``scheduler.timesteps`` is a new tensor
    (``set_timesteps`` ran, as every pipeline call does), when the calls run past its end, or
    when the timestep goes back to an earlier entry. The first call of a generation finds its
    position in ``scheduler.timesteps`` (img2img, or a refiner's ``denoising_start``, starts
    late; a base's ``denoising_end`` stops early); later calls advance by one entry, so a call
    costs no host-device sync. Step i is the i-th call from that start, and the generation has
    ``len(timesteps) - start`` steps.

    Samplers that call the U-Net several times per step (Heun, DPM2, PNDM's Runge-Kutta
    start) list one timestep entry per call, repeats included: every call is a step.
    Pipelines that call the model once per guidance branch (Wan: the conditional call, then
    the unconditional one, at the same timestep) make a call whose timestep is the current
    entry again where the next entry differs: that is the same step, call ``repeat`` (1, 2,
    ...) of it, and the generation keeps a cache per call of a step. Telling them apart reads
    the timestep on the host: on a GPU, pass it on the CPU or as a number for such pipelines.

    Without a scheduler, a generation starts when the timestep does not descend; this reads
    the timestep on the host on every call. A repeated timestep then starts over (a warning
    says to pass the scheduler). Calls the scheduler cannot place are counted that way too,
    said once: a timestep that is not among ``scheduler.timesteps`` (another scheduler drives
    them: a second pipeline sharing this U-Net with a scheduler of its own), or a scheduler
    whose ``set_timesteps`` never ran.
    """

    def __init__(self, scheduler: Any = None, timestep_divisor: float = 1.0) -> None:
        self.scheduler = scheduler
        # Flux-style models take the scheduler's timestep divided by 1000: the calls' timesteps
        # are matched against the scheduler's divided as the pipeline divides them (float32).
        self.timestep_divisor = timestep_divisor
        self._warned: set[str] = set()
        self._seen: dict[int, Any] = {}  # bound pipelines' schedulers: id -> the timesteps last seen
        self._driving: Any = None  # of those, the one whose timesteps place the calls
        self.reset()

    def reset(self) -> None:
        """Forgets the current generation; the next call starts a new one."""
        self._timesteps: torch.Tensor | None = None
        self._values: list[float] = []
        self._start = 0
        self._index = -1
        self._last_t: float | None = None
        self._foreign: torch.Tensor | None = None  # scheduler.timesteps that did not hold the calls' timesteps
        self.repeat = 0  # which call of its step the last call was (0: the first)

    def save(self) -> tuple[Any, ...]:
        """Returns the position, for ``restore`` (a refused call must not move it)."""
        return self._timesteps, self._values, self._start, self._index, self._last_t, self._foreign, self.repeat

    def restore(self, saved: tuple[Any, ...]) -> None:
        """Goes back to a position ``save`` returned."""
        self._timesteps, self._values, self._start, self._index, self._last_t, self._foreign, self.repeat = saved

    def advance(self, timestep: torch.Tensor, value: float | None = None) -> Step:
        """Returns the step of a call with ``timestep`` (shape (batch,)) and records it.

        ``value`` is the timestep's value when the caller could read it without a device sync.
        """
        scheduler = self.scheduler
        if scheduler is None:
            return self._advance_by_value(timestep, value)
        if isinstance(scheduler, PipelineScheduler):
            scheduler = self._drive(scheduler.schedulers(), timestep)
        timesteps = scheduler.timesteps
        if timesteps is None:
            self._warn_once("none", "scheduler.timesteps is None (set_timesteps never ran on the runtime's scheduler)")
            return self._advance_by_value(timestep, value)
        if timesteps is self._foreign:
            return self._advance_by_value(timestep, value)  # until the scheduler sets new timesteps
        index = self._index + 1
        fresh = timesteps is not self._timesteps or self._start + index >= len(self._values)
        if timesteps is self._timesteps and self._index >= 0:
            at = _entry_of_view(timestep, timesteps)
            if at is not None:
                # A view of scheduler.timesteps (what pipelines pass): its entry, with no device sync.
                if at == self._start + self._index:
                    self.repeat += 1  # the current entry again: another call of the same step
                    return self._index, len(self._values) - self._start, False
                fresh = fresh or at != self._start + index
            else:
                # A check that costs nothing on the CPU: the timestep must be the expected entry.
                if value is None and timestep.device.type == "cpu":
                    value = float(timestep[0])
                if not fresh:
                    fresh = value is not None and value != self._values[self._start + index]
                if fresh and value is not None and value == self._values[self._start + self._index]:
                    self.repeat += 1  # the current entry again, not the next: another call of the same step
                    return self._index, len(self._values) - self._start, False
        self.repeat = 0
        if fresh:
            located = self._locate(timesteps, timestep)
            if located is None:
                self._foreign, self._timesteps, self._last_t = timesteps, None, None
                return self._advance_by_value(timestep, value)
            self._start, self._values = located
            self._timesteps, self._foreign = timesteps, None
            index = 0
        self._index = index
        return index, len(self._values) - self._start, fresh

    def _drive(self, schedulers: list[Any], timestep: torch.Tensor) -> Any:
        """Returns the scheduler of the bound pipeline that drives this call: the one that set new timesteps.

        Where several did since the last call (the first call), the first whose
        ``set_timesteps`` ran (a scheduler made by ``from_config`` has default timesteps, and
        ``num_inference_steps`` None) and whose timesteps hold the call's timestep.
        """
        changed = []
        for sched in schedulers:
            timesteps = sched.timesteps
            if timesteps is not None and self._seen.get(id(sched)) is not timesteps:
                self._seen[id(sched)] = timesteps
                changed.append(sched)
        if len(changed) > 1:
            changed = [s for s in changed if getattr(s, "num_inference_steps", 1) is not None] or changed
        if len(changed) > 1:
            t = float(timestep[0])
            changed = [s for s in changed if t in self._values_of(s.timesteps)] or changed
        if changed:
            self._driving = changed[0]
        elif not any(s is self._driving for s in schedulers):
            self._driving = schedulers[0]
        return self._driving

    def position(self, step: int) -> float | None:
        """Returns the timestep of step ``step`` of the generation in progress (None when not known)."""
        i = self._start + step
        return self._values[i] if self._timesteps is not None and i < len(self._values) else None

    def _locate(self, timesteps: torch.Tensor, timestep: torch.Tensor) -> tuple[int, list[float]] | None:
        values = self._values_of(timesteps)
        t = float(timestep[0])
        begin = getattr(self._driving if self._driving is not None else self.scheduler, "begin_index", None) or 0
        for i in range(begin, len(values)):
            if values[i] == t:
                return i, values
        self._warn_once(
            "foreign",
            f"timestep {t} is not in the runtime's scheduler.timesteps {values[:4]}...: another scheduler drives "
            "these calls (a second pipeline sharing this U-Net?). Bind the runtime to that pipeline with "
            "dcfx.enable(pipe) or runtime.generation(scheduler=...) to count steps by its timesteps",
        )
        return None

    def _values_of(self, timesteps: torch.Tensor) -> list[float]:
        if self.timestep_divisor != 1.0:
            timesteps = timesteps.to(torch.float32) / self.timestep_divisor
        return [float(v) for v in timesteps.tolist()]

    def _advance_by_value(self, timestep: torch.Tensor, value: float | None) -> Step:
        t = float(timestep[0]) if value is None else value
        fresh = self._last_t is None or t >= self._last_t
        if t == self._last_t:
            self._warn_once(
                "repeat",
                f"timestep {t} repeated; counted by call, this starts a new generation (a full step). For samplers "
                "that repeat timesteps (Heun, DPM2, PNDM) pass scheduler= to dcfx.compile (or use "
                "dcfx.enable(pipe, ...)) so that every U-Net call counts as a step",
            )
        self._index = 0 if fresh else self._index + 1
        self._last_t = t
        return self._index, None, fresh

    def _warn_once(self, kind: str, message: str) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        if kind != "repeat":
            message += "; counting steps by call: a generation starts where the timestep stops descending"
        logger.warning("dcfx: %s", message)


def _entry_of_view(timestep: torch.Tensor, timesteps: torch.Tensor) -> int | None:
    """Returns the index of ``scheduler.timesteps`` that ``timestep`` is a view of (None: not a view of one entry).

    Pipelines pass ``t`` of ``for t in scheduler.timesteps`` (or ``t.expand(batch)``): a view
    whose storage offset names its entry, read without a device sync.
    """
    try:
        if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
            return None
    except (RuntimeError, NotImplementedError):
        return None
    if timesteps.ndim != 1 or timesteps.stride(0) != 1 or timestep.dtype != timesteps.dtype:
        return None
    if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.numel() > 1 and timestep.stride(0) != 0):
        return None  # several entries, not one entry expanded
    at = timestep.storage_offset() - timesteps.storage_offset()
    return at if 0 <= at < timesteps.shape[0] else None
