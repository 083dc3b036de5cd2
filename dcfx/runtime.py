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
from dcfx.watch import Changes, ModelWatch

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
    answers every attribute the model has (writes to those go to the model), so a pipeline
    cannot tell it apart. Per call it
    runs the full graph (and stores the cache feature in a preallocated buffer) or the
    shallow graph (which reads it). A step is full when the schedule says so, when no cache
    exists in this generation, or when the cache was made for other inputs (batch,
    resolution, dtype, device, or weights moved to another dtype or device): a stale cache is
    never used. Inference only (no autograd).

    Faults leave nothing behind: a call refused for bad input (checked once per input
    signature, before anything runs) changes nothing, and a call that fails while running
    invalidates the cache (the next call starts a new generation).

    The graphs follow the model: each generation (and each graph build) first checks that
    the model is still what its graphs baked in (``dcfx.watch.ModelWatch``: the module tree,
    every plain attribute on it, parameters and buffers by identity and in-place version).
    A change (LoRA adapters set, FreeU, attention processors, reloaded or moved weights)
    drops the graphs, which are built again, logged once at INFO; tensors written in place
    need no rebuild where the graphs read the live weights (``CompiledPair.follows_values``).

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
            "_feature_buffers": OrderedDict(),  # feature layout -> preallocated buffer (not nn.Module._buffers)
            "_tracker": StepTracker(self.scheduler),
            "_cache": None,  # the buffer holding this generation's cache feature
            "_cache_for": None,  # the input signature the cache was made for
            "_owner": None,  # the thread that started the generation in progress
            "_watch": ModelWatch(self.model),  # what the graphs baked in (see _check_model)
            "_dropped_for": None,  # the model change that dropped the graphs, until they are rebuilt
            "_probe": None,  # a parameter of the model: its dtype and device join each call's signature
            "stats": {"full": 0, "shallow": 0},
            "graph_builds": 0,
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

    def __setattr__(self, name: str, value: Any) -> None:
        # Pipelines write U-Net attributes through pipe.unet too (unload_ip_adapter sets
        # unet.encoder_hid_proj = None). An attribute of the model that the runtime does not
        # hold itself (nor its class: a patched forward stays the runtime's) goes to the model,
        # whose changes the graphs follow; set on the runtime, it would shadow the model's for
        # good (a reloaded IP-Adapter's projection unseen by the pipeline).
        model = self.__dict__.get("_modules", {}).get("model")
        if (
            model is not None
            and name not in self.__dict__
            and name not in self._modules
            and not hasattr(type(self), name)
            and hasattr(model, name)
        ):
            setattr(model, name, value)
        else:
            super().__setattr__(name, value)

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
        if config.schedule == "non-uniform" and config.steps is None and self.scheduler is None:
            raise ValueError(
                "the non-uniform schedule needs the step count: set steps= (this runtime has no scheduler)"
            )
        self.deepcache_config = config
        self._plans.clear()
        self.reset()
        return self

    def clear_graphs(self) -> None:
        """Drops every built graph pair and buffer; the next call of each input signature builds again.

        Changes to the model are followed without it (see the class docstring), except
        writes through ``param.data``, which PyTorch does not count as a change of the
        parameter: call this after those when a backend copies the weights (Inductor).
        """
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
        self._feature_buffers.clear()
        self._watch.forget()

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
                    with compile_lock:  # see _check_model
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
            self._check_model()
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
            with compile_lock:  # see _check_model
                # Not through nn.Module.__setattr__, which would register the parameter as the runtime's own.
                self.__dict__["_probe"] = next(self.model.parameters(), None)
        probe = self._probe
        return None if probe is None else (probe.dtype, probe.device)

    def _check_model(self) -> None:
        # Once per generation and before each build: drops graphs that no longer match the
        # model (about 0.5 ms on SD1.5: see dcfx.watch). A capture in another thread swaps the
        # module's parameters for fake tensors while it traces, holding compile_lock: read
        # the module only under the lock.
        with compile_lock:
            changes = self._watch.changes()
        if changes is None:
            return
        self._probe = None
        if changes.only_written and all(pair.follows_values for pair in self._pairs.values()):
            # Weights written in place: the graphs read the live storage, nothing is stale.
            with compile_lock:
                self._watch.record()
            return
        logger.info("dcfx: the U-Net changed since its graphs were built (%s); building them again", changes)
        self._drop_pairs()
        self._dropped_for = changes

    def _step_plan(self, num_steps: int | None) -> schedule.StepPlan:
        # Only the non-uniform schedule depends on the step count: one plan per count, made once.
        if self.deepcache_config.schedule != "non-uniform":
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
            if cfg.schedule != "non-uniform" or num_steps is None:
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
            self._check_model()  # a change since this generation began must not leave other graphs stale
            logger.info("dcfx: building graphs for %s", [tuple(s) for s, _, _ in key[1]])
            try:
                pair = self._build(names, tensors)
            except Exception as e:
                if self._dropped_for is not None:
                    raise _rebuild_failed(self._dropped_for, e) from e
                raise
            with compile_lock:
                self._watch.record()
            self._dropped_for = None
            self.graph_builds += 1
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
        buffer = self._feature_buffers.get(fkey)
        if buffer is None:
            buffer = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            self._feature_buffers[fkey] = buffer
            if len(self._feature_buffers) > MAX_GRAPH_PAIRS:
                self._feature_buffers.popitem(last=False)
        self._feature_buffers.move_to_end(fkey)
        return buffer


def _rebuild_failed(changes: Changes, error: Exception) -> Exception:
    message = f"the U-Net changed since its graphs were built ({changes}), and building them again failed: {error}"
    try:
        return type(error)(message)
    except Exception:  # an exception class that takes other arguments
        return RuntimeError(message)


def _release(pair: CompiledPair) -> None:
    if pair.release is not None:
        pair.release()
