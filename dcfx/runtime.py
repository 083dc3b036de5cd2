"""The module that replaces ``pipe.unet``: step tracking, the cache buffer, the graph swap.

The runtime knows graph pairs only as callables (``CompiledPair``) made by a ``build``
function for each input signature; it knows nothing of FX or of how they were made.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcfx import schedule
from dcfx.backends import CompiledPair, compile_lock
from dcfx.config import DeepCacheConfig
from dcfx.models import ModelSpec

logger = logging.getLogger(__name__)

# At most this many graph pairs (one per input signature: shapes, dtypes, device) are kept;
# the least recently used is dropped first. Feature buffers follow the same bound.
MAX_GRAPH_PAIRS = 8
# At most this many non-uniform step plans (one per generation length) are kept.
MAX_STEP_PLANS = 32

Signature = tuple[
    tuple[str, ...],
    tuple[tuple[torch.Size, torch.dtype, torch.device], ...],
    tuple[torch.dtype, torch.device] | None,  # the weights' dtype and device
]
BuildFn = Callable[[tuple[str, ...], tuple[torch.Tensor, ...]], CompiledPair]


@dataclass
class Step:
    """Where a U-Net call falls: its step index in the generation and the generation length."""

    index: int
    num_steps: int | None
    new_generation: bool


class StepTracker:
    """Counts the U-Net calls of each generation and notices when a new one starts.

    With a scheduler, a generation starts when ``scheduler.timesteps`` is a new tensor
    (``set_timesteps`` ran, as every pipeline call does), when the calls run past its end, or
    when the timestep goes back to an earlier entry. The first call of a generation finds its
    position in ``scheduler.timesteps`` (img2img starts late); later calls advance by one
    entry, so a call costs no host-device sync. Step i is the i-th call from that start, and
    the generation has ``len(timesteps) - start`` steps.

    Samplers that call the U-Net several times per step (Heun, DPM2, PNDM's Runge-Kutta
    start) list one timestep entry per call, repeats included: every call is a step.

    Without a scheduler, a generation starts when the timestep does not descend; this reads
    the timestep on the host on every call. A repeated timestep then starts over (a warning
    says to pass the scheduler).
    """

    def __init__(self, scheduler: Any = None) -> None:
        self.scheduler = scheduler
        self._warned_repeat = False
        self.reset()

    def reset(self) -> None:
        """Forgets the current generation; the next call starts a new one."""
        self._timesteps: torch.Tensor | None = None
        self._values: list[float] = []
        self._start = 0
        self._index = -1
        self._last_t: float | None = None

    def advance(self, timestep: torch.Tensor) -> Step:
        """Returns the step of a call with ``timestep`` (shape (batch,)) and records it."""
        if self.scheduler is None:
            return self._advance_by_value(timestep)
        timesteps = self.scheduler.timesteps
        if timesteps is None:
            raise ValueError("scheduler.timesteps is None: call scheduler.set_timesteps() before the U-Net")
        index = self._index + 1
        fresh = timesteps is not self._timesteps or self._start + index >= len(self._values)
        if not fresh and timestep.device.type == "cpu":
            # A check that costs nothing on the CPU: the timestep must be the expected entry.
            fresh = float(timestep[0]) != self._values[self._start + index]
        if fresh:
            self._start = self._locate(timesteps, timestep)
            index = 0
        self._index = index
        return Step(index, len(self._values) - self._start, fresh)

    def _locate(self, timesteps: torch.Tensor, timestep: torch.Tensor) -> int:
        self._timesteps = timesteps
        self._values = [float(v) for v in timesteps.tolist()]
        t = float(timestep[0])
        begin = getattr(self.scheduler, "begin_index", None) or 0
        for i in range(begin, len(self._values)):
            if self._values[i] == t:
                return i
        raise ValueError(
            f"timestep {t} is not in scheduler.timesteps {self._values[:8]}...: pass the pipeline's "
            f"scheduler to dcfx.compile(scheduler=...), or none to count steps by call"
        )

    def _advance_by_value(self, timestep: torch.Tensor) -> Step:
        t = float(timestep[0])
        fresh = self._last_t is None or t >= self._last_t
        if t == self._last_t and not self._warned_repeat:
            self._warned_repeat = True
            logger.warning(
                "dcfx: timestep %s repeated; without a scheduler this starts a new generation (a full "
                "step). For samplers that repeat timesteps (Heun, DPM2, PNDM) pass scheduler= to "
                "dcfx.compile (or use dcfx.enable(pipe, ...)) so that every U-Net call counts as a step",
                t,
            )
        self._index = 0 if fresh else self._index + 1
        self._last_t = t
        return Step(self._index, None, fresh)


class DeepCacheUNet(nn.Module):
    """A drop-in for a diffusers U-Net that runs DeepCache's full and shallow graphs.

    It keeps the wrapped model (its parameters, ``config``, ``dtype``, ``device``, ...) and
    answers every attribute the model has, so a pipeline cannot tell it apart. Per call it
    runs the full graph (and stores the cache feature in a preallocated buffer) or the
    shallow graph (which reads it). A step is full when the schedule says so, when no cache
    exists in this generation, or when the cache was made for other inputs (batch,
    resolution, dtype, device, or weights moved to another dtype or device): a stale cache is
    never used. Inference only (no autograd).

    Faults leave nothing behind: a call refused for bad input (checked once per input
    signature, before anything runs) changes nothing, and a call that fails while running
    invalidates the cache (the next call starts a new generation). Each
    generation checks that the model still holds the weights its graphs were built from
    (replaced or moved parameters drop the graphs, which are then built again).

    One runtime keeps one generation's state, so it serves one thread at a time: a call while
    another thread is inside ``forward``, or a call from another thread that would continue
    the generation in progress, raises RuntimeError. Pipelines that run in parallel each
    take their own runtime; ``dcfx.compile`` shares the weights, not copies them. Their graph
    runs, captures and compiles take turns under one process-wide lock (``compile_lock``):
    torch.export swaps the shared parameters' contents for fake tensors while it captures.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DeepCacheConfig,
        spec: ModelSpec,
        build: BuildFn,
        scheduler: Any = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.deepcache_config = config
        self.scheduler = scheduler
        self._spec = spec
        self._build = build
        self._plans: OrderedDict[int | None, schedule.StepPlan] = OrderedDict()
        self._lock = threading.Lock()
        self.__dict__.update(self._clean_state())

    def _clean_state(self) -> dict[str, Any]:
        """The state of a runtime that has run nothing: no graphs, buffers or cache, zero stats."""
        return {
            "_pairs": OrderedDict(),  # Signature -> CompiledPair
            "_buffers": OrderedDict(),  # feature layout -> preallocated buffer
            "_tracker": StepTracker(self.scheduler),
            "_cache": None,  # the buffer holding this generation's cache feature
            "_cache_for": None,  # the input signature the cache was made for
            "_owner": None,  # the thread that started the generation in progress
            "_weights": None,  # the parameters the graphs were built from (see _check_weights)
            "_probe": None,  # one of those parameters: its dtype and device join each call's signature
            "stats": {"full": 0, "shallow": 0},
        }

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle, torch.save) starts clean: compiled code does not
        # pickle, and graphs hold the original's weights. Its first call of each input
        # signature builds graphs again, from the copy's own weights.
        state = {**super().__getstate__(), **self._clean_state()}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = super().__getattr__("model")
            return getattr(model, name)

    def reset(self) -> None:
        """Starts a new generation: forgets the step count and invalidates the cache.

        Safe at any point, from any thread that is not inside a call.
        """
        self._tracker.reset()
        self._cache_for = None
        self._owner = None

    def reschedule(self, config: DeepCacheConfig | None = None, **fields: Any) -> DeepCacheUNet:
        """Returns this runtime switched to another schedule of the same branch, graphs kept.

        Pass a whole ``DeepCacheConfig`` or the fields to change (``reschedule(interval=5)``).
        The graphs are cut at the branch, so they serve every schedule of it: trying intervals
        costs no new capture or compile. Starts a new generation.

        Raises:
            ValueError: the branch differs (compile again for another branch), or the
                non-uniform schedule lacks its step count.
            TypeError: both a config and fields, or a config of the wrong type.
        """
        if config is not None and fields:
            raise TypeError(f"pass either a DeepCacheConfig or fields to change, not both (got {sorted(fields)})")
        if config is None:
            config = dataclasses.replace(self.deepcache_config, **fields)
        elif not isinstance(config, DeepCacheConfig):
            raise TypeError(f"config must be a DeepCacheConfig, got {type(config).__name__}")
        if config.branch != self.deepcache_config.branch:
            raise ValueError(
                f"this runtime's graphs are cut at branch {self.deepcache_config.branch}; branch {config.branch} "
                "needs its own graphs: dcfx.compile(runtime.model, ...) again"
            )
        if config.schedule_spec.needs_step_count() and self.scheduler is None:
            raise ValueError(
                f"the {config.schedule} schedule needs the step count: set steps= (this runtime has no scheduler)"
            )
        self.deepcache_config = config
        self._plans.clear()
        self.reset()
        return self

    def clear_graphs(self) -> None:
        """Drops every built graph pair and buffer (after changing weights, for example)."""
        self._drop_pairs()
        self.reset()

    def __del__(self) -> None:
        # A runtime dropped without clear_graphs() still lets go of what its graphs keep
        # outside it (torch.fx's copy of their generated source).
        if self.__dict__.get("_pairs"):
            self._drop_pairs()

    def _drop_pairs(self) -> None:
        while self._pairs:
            _release(self._pairs.popitem()[1])
        self._buffers.clear()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the U-Net call ``model(*args, **kwargs)`` as a full or a shallow step.

        Raises:
            TypeError, ValueError: bad inputs (checked once per input signature), naming the
                bad value and what the model takes; nothing changes.
            RuntimeError: another thread is using this runtime (see the class docstring).
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "this dcfx runtime is running a call in another thread; a runtime keeps one generation's state "
                "and serves one thread at a time: give each pipeline or thread its own dcfx.compile(unet, ...) "
                "(the weights are shared, not copied)"
            )
        try:
            (names, tensors), return_dict = self._spec.flatten(self.model, args, kwargs)
            before = (copy.copy(self._tracker), self._owner, self._cache_for)
            try:
                step = self._advance(tensors[names.index("timestep")])
                key: Signature = (names, tuple((t.shape, t.dtype, t.device) for t in tensors), self._weights_key())
                if key not in self._pairs:
                    with compile_lock:  # see _check_weights
                        self._spec.check_inputs(self.model, names, tensors)
                plan = self._step_plan(step.num_steps)
                full = self._cache_for != key or plan.is_full(step.index)
                pair = self._pair(key, names, tensors)
            except BaseException:
                # A refused call (bad input, a build that failed) ran no graph and changes
                # nothing: the generation in progress goes on.
                self._tracker, self._owner, self._cache_for = before
                raise
            try:
                sample = self._run(full, key, pair, tensors)
            except BaseException:
                # Whatever failed (a graph, a build, out of memory, an interrupt), no cache of
                # this generation is trusted again: the next call starts a new one.
                self.reset()
                raise
        finally:
            self._lock.release()
        self.stats["full" if full else "shallow"] += 1
        return self._spec.output(sample, return_dict)

    def _advance(self, timestep: torch.Tensor) -> Step:
        thread = threading.get_ident()
        step = self._tracker.advance(timestep)
        if not step.new_generation and self._owner not in (None, thread):
            raise RuntimeError(
                f"this dcfx runtime is in the middle of a generation started by thread {self._owner}; "
                "a call from another thread may start a new generation but not continue that one. Give each "
                "pipeline or thread its own dcfx.compile(unet, ...), or call reset() between generations"
            )
        if step.new_generation:
            self._owner = thread
            self._cache_for = None
            self._check_weights()
        return step

    def _run(self, full: bool, key: Signature, pair: CompiledPair, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # Under the process-wide lock: a capture in another thread swaps the shared parameters'
        # contents for fake tensors while it traces, and a graph run meanwhile would read them.
        with torch.no_grad(), compile_lock:
            if full:
                self._cache_for = None  # a full step that fails half way leaves no valid cache
                sample, self._cache = pair.run_full(tensors, self._buffer)
                self._cache_for = key
            else:
                sample = pair.run_shallow(tensors, self._cache)
        return sample

    def _weights_key(self) -> tuple[torch.dtype, torch.device] | None:
        if self._probe is None:
            with compile_lock:  # see _check_weights
                self._probe = next(self.model.parameters(), None)
        probe = self._probe
        return None if probe is None else (probe.dtype, probe.device)

    def _check_weights(self) -> None:
        # Graphs reference the parameters they were captured with (Inductor's freezing even
        # copies their values). A parameter replaced since (load_state_dict(assign=True),
        # .to() under overwrite_module_params_on_conversion) or moved would leave them computing
        # with stale weights, so they are dropped. Checked once per generation (about 1 ms for
        # SD1.5's 686 parameters), not per step.
        # A capture in another thread (torch.export) swaps the module's parameters for fake
        # tensors while it traces, holding compile_lock: read them only under the lock.
        with compile_lock:
            params = list(self.model.parameters())
        weights = tuple((id(p), p.data_ptr(), p.dtype, p.device) for p in params)
        if self._weights is not None and weights != self._weights and self._pairs:
            logger.info("dcfx: the U-Net's parameters were replaced or moved since its graphs were built; rebuilding")
            self._drop_pairs()
        self._weights = weights
        self._probe = params[0] if params else None

    def _step_plan(self, num_steps: int | None) -> schedule.StepPlan:
        # Only a schedule that depends on the step count (non-uniform) needs one plan per count, made once.
        if not self.deepcache_config.schedule_spec.per_step_count:
            num_steps = None
        plan = self._plans.get(num_steps)
        if plan is None:
            plan = self._plans[num_steps] = self._make_plan(num_steps)
            if len(self._plans) > MAX_STEP_PLANS:
                self._plans.popitem(last=False)
        self._plans.move_to_end(num_steps)
        return plan

    def _make_plan(self, num_steps: int | None) -> schedule.StepPlan:
        cfg = self.deepcache_config
        try:
            return schedule.plan(cfg, num_steps)
        except ValueError as e:
            if not cfg.schedule_spec.per_step_count or num_steps is None:
                raise
            # A generation shorter than the configured one (img2img, a reset mid-way) can leave
            # the centre outside it or the search without a solution: it runs uniform, said once.
            logger.warning(
                "dcfx: %s. This %d-step generation runs the uniform 1:%d schedule", e, num_steps, cfg.interval
            )
            return schedule.plan(DeepCacheConfig(branch=cfg.branch, interval=cfg.interval), num_steps)

    def _pair(self, key: Signature, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> CompiledPair:
        pair = self._pairs.get(key)
        if pair is None:
            logger.info("dcfx: building graphs for %s", [tuple(s) for s, _, _ in key[1]])
            pair = self._build(names, tensors)
            self._pairs[key] = pair
            if len(self._pairs) > MAX_GRAPH_PAIRS:
                _release(self._pairs.popitem(last=False)[1])
        self._pairs.move_to_end(key)
        return pair

    def _buffer(
        self, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        # The buffer keeps the feature's strides: some features come out channels-last, and a
        # shallow graph fed another layout takes other kernels (1e-5 off over ten steps).
        fkey = (tuple(shape), tuple(stride), dtype, device)
        buffer = self._buffers.get(fkey)
        if buffer is None:
            buffer = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            self._buffers[fkey] = buffer
            if len(self._buffers) > MAX_GRAPH_PAIRS:
                self._buffers.popitem(last=False)
        self._buffers.move_to_end(fkey)
        return buffer


def _release(pair: CompiledPair) -> None:
    if pair.release is not None:
        pair.release()
