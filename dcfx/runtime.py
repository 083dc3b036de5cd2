"""The module that replaces ``pipe.unet``: shared graphs, per-generation state, the graph swap.

The runtime knows graph pairs only as callables (``CompiledPair``) made by a ``build``
function for each input signature; it knows nothing of FX or of how they were made. The
graphs and the weights are shared by every generation; each generation has its own small
state (``Generation``: its step tracking and its cache buffer).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dcfx.backends import Build, CompiledPair, compile_lock
from dcfx.config import DeepCacheConfig
from dcfx.hooks import check_hooks
from dcfx.limits import MAX_GRAPH_PAIRS, MAX_SIGNATURES
from dcfx.models import ModelSpec
from dcfx.planner import Decision, GenerationPlan, Planner
from dcfx.scalars import scalar
from dcfx.steps import StepTracker
from dcfx.watch import Changes, ModelWatch

logger = logging.getLogger(__name__)


Signature = tuple[
    tuple[str, ...],
    tuple[tuple[torch.Size, torch.dtype, torch.device], ...],
    tuple[torch.dtype, torch.device] | None,  # the weights' dtype and device
]


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
    """

    __slots__ = ("_busy", "_epoch", "_slot", "buffers", "plan", "tracker")

    def __init__(self, scheduler: Any, epoch: int) -> None:
        self.tracker = StepTracker(scheduler)
        self.plan: GenerationPlan | None = None
        self.buffers: list[torch.Tensor | None] = [None, None]
        self._slot = 0  # the buffer the next full step writes
        self._busy = threading.Lock()
        self._epoch = epoch

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
        if self.plan is not None:
            self.plan.drop()

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

    One runtime serves any number of generations at once, with one copy of the graphs and
    the weights: each thread has its own generation state (step tracking and cache), and
    ``with runtime.generation():`` gives a block of code one of its own (an async server that
    interleaves generations on one thread). Steps take no process-wide lock: graph builds
    (captures, compiles) take turns under ``compile_lock`` and work on a clone of the module
    tree, while the steps of built graphs go on in other threads.

    Faults leave nothing behind: a call refused for bad input (checked once per input
    signature, before anything runs) changes nothing, and a call that fails while running
    invalidates the cache (the next call starts a new generation).

    The graphs follow the model: each generation (and each graph build) first checks that
    the model is still what its graphs baked in (``dcfx.watch.ModelWatch``: the module tree,
    every plain attribute on it, parameters and buffers by identity and in-place version).
    A change (LoRA adapters set, FreeU, attention processors, reloaded or moved weights)
    drops the graphs, which are built again, logged once at INFO; tensors written in place
    need no rebuild where the graphs read the live weights (``CompiledPair.follows_values``).
    """

    def __init__(
        self,
        model: nn.Module,
        config: DeepCacheConfig,
        spec: ModelSpec,
        build: Build,
        scheduler: Any = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.deepcache_config = config
        self.scheduler = scheduler
        self._spec = spec
        self._build = build
        # What diffusers reads to record and save a pipeline's component (see __class__).
        self.__dict__["__module__"] = model.__class__.__module__
        self.__dict__.update(self._clean_state())

    # A drop-in passes the checks pipelines and users make: isinstance(pipe.unet,
    # UNet2DConditionModel) holds (isinstance falls back on __class__), and diffusers'
    # save_pretrained finds the model's class, records it as the component's and calls its
    # save method, which reaches the wrapped model (__getattr__): the pipeline saves the model
    # itself, loadable without dcfx. type(runtime) stays DeepCacheUNet.
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        model = self.__dict__.get("_modules", {}).get("model")
        return DeepCacheUNet if model is None else model.__class__

    def _get_name(self) -> str:
        return "DeepCacheUNet"

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Pickling reads __class__; a copy is a DeepCacheUNet (which starts clean: __getstate__).
        return _new_runtime, (type(self),), self.__getstate__()

    def _clean_state(self) -> dict[str, Any]:
        """The state of a runtime that has run nothing: no graphs or generations, zero stats.

        Kept in ``__dict__`` directly, out of nn.Module's attribute handling.
        """
        return {
            "_pairs": {},  # Signature -> CompiledPair (several signatures may share one: see _buckets)
            "_buckets": {},  # a ranged build's bucket -> the pair serving every call in it
            "_used": {},  # id(pair) -> tick of its last use (least recently used dropped first)
            "_ticks": itertools.count(),
            "_planner": Planner(self.deepcache_config),  # each generation's steps (dcfx.planner)
            "_binders": {},  # (number of positional arguments, keywords) -> CallBinder
            "_lock": threading.Lock(),  # guards _pairs/_used changes and stats; never held while a graph runs
            "_check_lock": threading.Lock(),  # one model-change check at a time (a change is handled once)
            "_local": threading.local(),  # each thread's Generation
            "_current": contextvars.ContextVar("dcfx_generation", default=None),  # generation() blocks
            "_epoch": 0,  # moves on reschedule() and clear_graphs(): every generation starts anew
            "_forecasting": self.deepcache_config.forecast_spec.forecasts,
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
        state = super().__getstate__()
        for key in self._clean_state():
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.update(self._clean_state())

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

    @property
    def planner(self) -> Planner:
        """Plans this runtime's generations (its config's schedule and forecast mode); ``reschedule`` replaces it.

        The serving engine takes each of its generations' plans from here, so a served
        generation steps as an offline one through this runtime does.
        """
        return self._planner

    def generation(self, scheduler: Any = None) -> contextlib.AbstractContextManager[Generation]:
        """Returns a context in which this runtime's calls run a generation of their own.

        For servers that interleave generations on one thread (asyncio), or pipelines that
        share one compiled U-Net but each have their own scheduler: each request's denoising
        loop runs inside its own block, and its steps see only its own cache. The block's
        generation belongs to the context (``contextvars``), so asyncio tasks keep theirs
        apart. Outside any block, each thread has one generation state of its own.

        Args:
            scheduler: The scheduler that drives this generation (its ``timesteps`` give the
                step index and count); default: the runtime's.

        Example:
            >>> with runtime.generation(scheduler=pipe.scheduler):
            ...     image = pipe(prompt).images[0]
        """
        return self._generation_block(self.scheduler if scheduler is None else scheduler)

    @contextlib.contextmanager
    def _generation_block(self, scheduler: Any) -> Iterator[Generation]:
        state = Generation(scheduler, self._epoch)
        token = self._current.set(state)
        try:
            yield state
        finally:
            self._current.reset(token)

    def reset(self) -> None:
        """Starts a new generation in the calling thread's (or ``generation()`` block's) state.

        Safe at any point, from a thread that is not inside a call of that generation.
        """
        self._state().reset()

    def reschedule(self, config: DeepCacheConfig | None = None, **fields: Any) -> DeepCacheUNet:
        """Returns this runtime switched to another schedule of the same branch, graphs kept.

        Pass a whole ``DeepCacheConfig`` or the fields to change (``reschedule(interval=5)``).
        The graphs are cut at the branch, so they serve every schedule of it: trying intervals
        costs no new capture or compile (turning forecasting on or off builds them again, with
        or without the forecast graph). Every generation starts anew at its next call.

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
        forecast_changed = config.forecast_spec.forecasts != self._forecasting
        with self._lock:
            self.deepcache_config = config
            self.__dict__["_planner"] = Planner(config)
            self.__dict__["_epoch"] += 1
            self.__dict__["_forecasting"] = config.forecast_spec.forecasts
        if forecast_changed:
            self._drop_pairs()  # the forecast graph is built with the pair, when forecasting
        return self

    def clear_graphs(self) -> None:
        """Drops every built graph pair; the next call of each input signature builds again.

        Changes to the model are followed without it (see the class docstring), except
        writes through ``param.data``, which PyTorch does not count as a change of the
        parameter: call this after those when a backend copies the weights (Inductor).
        Every generation starts anew at its next call.
        """
        self._drop_pairs()
        self.__dict__["_epoch"] += 1

    def __del__(self) -> None:
        # A runtime dropped without clear_graphs() still lets go of what its graphs keep
        # outside it (torch.fx's copy of their generated source).
        if self.__dict__.get("_pairs"):
            self._drop_pairs()

    def _drop_pairs(self) -> None:
        with self._lock:
            pairs = list({id(p): p for p in self._pairs.values()}.values())
            self._pairs.clear()
            self._buckets.clear()
            self._used.clear()
            self._watch.forget()
        for pair in pairs:
            _release(pair)

    def _state(self) -> Generation:
        state = self._current.get()
        if state is None:
            state = getattr(self._local, "state", None)
            if state is None:
                state = self._local.state = Generation(self.scheduler, self._epoch)
        return state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the U-Net call ``model(*args, **kwargs)`` as a full or a shallow step.

        Raises:
            TypeError, ValueError: bad inputs (checked once per input signature), naming the
                bad value and what the model takes; nothing changes.
            RuntimeError: the same ``generation()`` state is inside a call in another thread.
        """
        state = self._state()
        if not state._busy.acquire(blocking=False):
            raise RuntimeError(
                "this dcfx generation is inside a call in another thread: a generation's steps run one at a time. "
                "Threads get a generation each by default; share a runtime.generation() block only within one thread"
            )
        try:
            return self._step(state, args, kwargs)
        finally:
            state._busy.release()

    def graphs_for(self, *args: Any, **kwargs: Any) -> tuple[CompiledPair, tuple[torch.Tensor, ...]]:
        """Returns the graph pair that serves the U-Net call ``(*args, **kwargs)`` and its flat inputs.

        No step is taken and no generation state is touched: for callers that schedule full
        and shallow steps themselves (``dcfx.serve``'s engine batches the steps of many
        generations and keeps their cache rows). The pair is built if needed (inputs checked
        first, as for a step) and the model checked for changes, as at a generation's start.
        ``pair.run_full(inputs, buffer_for)`` returns ``(sample, cache)``;
        ``pair.run_shallow(inputs, cache)`` the sample.

        Raises:
            TypeError, ValueError: bad inputs, as ``forward`` raises them.
        """
        form = (len(args), tuple(kwargs))
        binder = self._binders.get(form)
        if binder is None:
            binder = self._binders[form] = self._spec.binder(self.model, *form)
        names, tensors, _, _, _ = binder.flatten(args, kwargs)
        key: Signature = (names, tuple([(t.shape, t.dtype, t.device) for t in tensors]), self._weights_key())
        self._check_model()
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._new_pair(key, names, tensors)
        self._used[id(pair)] = next(self._ticks)
        return pair, tensors

    def _step(self, state: Generation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        form = (len(args), tuple(kwargs))
        binder = self._binders.get(form)
        if binder is None:
            binder = self._binders[form] = self._spec.binder(self.model, *form)
        names, tensors, return_dict, timestep, value = binder.flatten(args, kwargs)
        key: Signature = (names, tuple([(t.shape, t.dtype, t.device) for t in tensors]), self._weights_key())
        if state._epoch != self._epoch:
            state.reset()
            state._epoch = self._epoch
        saved = (state.tracker.save(), state.plan)
        try:
            index, num_steps, new = state.tracker.advance(timestep, value)
            if new:
                self._check_model()
                state.plan = self._planner.start(num_steps)
            pair = self._pairs.get(key)
            if pair is None:
                pair = self._new_pair(key, names, tensors)
        except BaseException:
            # A refused call (bad input, a build that failed) ran no graph and changes
            # nothing: the generation in progress goes on.
            state.tracker.restore(saved[0])
            state.plan = saved[1]
            raise
        self._used[id(pair)] = next(self._ticks)
        position = 0.0
        if self._forecasting:
            # The step's place on the sampler's time axis: its timestep (a forecast from the
            # last two full steps moves the feature by how far the timestep moved).
            position = state.tracker.position(index)
            if position is None:
                position = value if value is not None else float(timestep[0])
        # A cache made by other graphs or for other inputs is stale (one ranged pair serves
        # many sizes: its cache fits only calls of the size that made it).
        source = (pair, key)
        decision = state.plan.decide(index, position, source)
        try:
            if torch.is_grad_enabled():
                with torch.no_grad():
                    sample = self._run(state, decision, pair, source, tensors, position)
            else:
                sample = self._run(state, decision, pair, source, tensors, position)
        except BaseException:
            # Whatever failed (a graph, out of memory, an interrupt), no cache of this
            # generation is trusted again: the next call starts a new one.
            state.reset()
            raise
        with self._lock:
            self.stats["full" if decision.full else "shallow"] += 1
        return self._spec.output(sample, return_dict)

    def _run(
        self,
        state: Generation,
        decision: Decision,
        pair: CompiledPair,
        source: tuple[CompiledPair, Signature],
        tensors: tuple[torch.Tensor, ...],
        position: float,
    ) -> torch.Tensor:
        plan = state.plan
        if decision.full:
            if decision.rotate:
                state._slot ^= 1  # the newest feature stays, as the previous one; the new one goes to the other buffer
            sample, cache = pair.run_full(tensors, state.buffer_for)
            plan.record_full(decision, position, source, cache)
            return sample
        cache = plan.newest.payload
        if decision.coefficient is not None:
            coefficient = scalar(decision.coefficient, torch.float32, cache.device)
            return pair.run_forecast(tensors, cache, plan.previous.payload, coefficient)
        return pair.run_shallow(tensors, cache)

    def _weights_key(self) -> tuple[torch.dtype, torch.device] | None:
        probe = self._probe
        if probe is None:
            # Not through nn.Module.__setattr__, which would register the parameter as the runtime's own.
            probe = self.__dict__["_probe"] = next(self.model.parameters(), None)
            if probe is None:
                return None
        return probe.dtype, probe.device

    def _check_model(self) -> None:
        # Once per generation and before each build: drops graphs that no longer match the
        # model (about 0.5 ms on SD1.5: see dcfx.watch). Captures work on a clone of the module
        # tree, so the module read here is never half-swapped by a capture in another thread.
        with self._check_lock:
            changes = self._watch.changes()
            if changes is None:
                return
            self.__dict__["_probe"] = None
            if changes.only_written and all(pair.follows_values for pair in list(self._pairs.values())):
                self._watch.record()  # weights written in place: the graphs read the live storage
                return
            logger.info("dcfx: the U-Net changed since its graphs were built (%s); building them again", changes)
            self._drop_pairs()
            self.__dict__["_dropped_for"] = changes

    def _new_pair(self, key: Signature, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> CompiledPair:
        # Builds take turns (torch.export and Inductor keep process-wide state while they
        # trace); the steps of built graphs in other threads go on meanwhile.
        with compile_lock:
            pair = self._pairs.get(key)  # built by another thread while this one waited
            if pair is not None:
                return pair
            self._check_model()  # a change since this generation began must not leave other graphs stale
            check_hooks(self.model)  # offloading hooks are named before a device check would misread them
            self._spec.check_inputs(self.model, names, tensors)
            # A build over ranges (dynamic shapes) serves every call of a bucket with one pair.
            bucket_key = self._build.bucket(names, tensors)
            if bucket_key is not None:
                bucket_key = (bucket_key, key[2])
                pair = self._buckets.get(bucket_key)
            if pair is None:
                logger.info("dcfx: building graphs for %s", [tuple(s) for s, _, _ in key[1]])
                try:
                    pair = self._build(names, tensors, **({"forecast": True} if self._forecasting else {}))
                except Exception as e:
                    if self._dropped_for is not None:
                        raise _rebuild_failed(self._dropped_for, e) from e
                    raise
                self._watch.record()
                self.__dict__["_dropped_for"] = None
                self.__dict__["graph_builds"] += 1
            with self._lock:
                self._pairs[key] = pair
                if bucket_key is not None:
                    self._buckets[bucket_key] = pair
                self._used[id(pair)] = next(self._ticks)
                evicted = self._evict()
        for old in evicted:
            _release(old)
        return pair

    def _evict(self) -> list[CompiledPair]:
        # Under self._lock. At most MAX_GRAPH_PAIRS distinct pairs, the least recently used
        # dropped first with every signature that led to it; a pair shared by many signatures
        # (a bucket) keeps at most MAX_SIGNATURES of them, the pair itself staying.
        pairs = {id(p): p for p in self._pairs.values()}
        evicted = []
        while len(pairs) > MAX_GRAPH_PAIRS:
            oldest = min(pairs, key=lambda i: self._used.get(i, -1))
            evicted.append(pairs.pop(oldest))
            for k in [k for k, p in self._pairs.items() if id(p) == oldest]:
                del self._pairs[k]
            for b in [b for b, p in self._buckets.items() if id(p) == oldest]:
                del self._buckets[b]
            self._used.pop(oldest, None)
        bucketed = {id(p) for p in self._buckets.values()}
        for k in [k for k, p in self._pairs.items() if id(p) in bucketed][: max(0, len(self._pairs) - MAX_SIGNATURES)]:
            del self._pairs[k]  # found again through its bucket
        return evicted


def _new_runtime(cls: type[DeepCacheUNet]) -> DeepCacheUNet:
    """Returns an empty runtime for unpickling to fill (``__setstate__``)."""
    return cls.__new__(cls)


def _rebuild_failed(changes: Changes, error: Exception) -> Exception:
    message = f"the U-Net changed since its graphs were built ({changes}), and building them again failed: {error}"
    try:
        return type(error)(message)
    except Exception:  # an exception class that takes other arguments
        return RuntimeError(message)


def _release(pair: CompiledPair) -> None:
    if pair.release is not None:
        pair.release()
