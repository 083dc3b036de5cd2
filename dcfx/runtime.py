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
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dcfx.backends import Build, CompiledPair
from dcfx.config import DeepCacheConfig
from dcfx.generation import Generation
from dcfx.graphs import GraphCache
from dcfx.models import ModelSpec
from dcfx.planner import Planner

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RuntimeState:
    """Everything a runtime holds beyond its model, settings and build; a copy starts with a new one.

    ``graphs`` (the pairs and the model check), ``planner`` (each generation's steps), the
    generations (each thread's, or a ``generation()`` block's through ``current``), the
    ``epoch`` that ``reschedule`` and ``clear_graphs`` move on, and the step counts.
    """

    graphs: GraphCache
    planner: Planner
    forecasting: bool
    epoch: int = 0
    binders: dict[tuple[int, tuple[str, ...]], Any] = dataclasses.field(default_factory=dict)
    local: threading.local = dataclasses.field(default_factory=threading.local)
    current: contextvars.ContextVar[Generation | None] = dataclasses.field(
        default_factory=lambda: contextvars.ContextVar("dcfx_generation", default=None)
    )
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # guards stats and reschedule
    stats: dict[str, int] = dataclasses.field(default_factory=lambda: {"full": 0, "shallow": 0})


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
        config = self.deepcache_config
        graphs = GraphCache(self.model, self._spec, self._build)
        return {"_rt": RuntimeState(graphs, Planner(config), config.forecast_spec.forecasts)}

    @property
    def stats(self) -> dict[str, int]:
        """Steps run by this runtime: ``{"full": n, "shallow": m}``."""
        return self._rt.stats

    @property
    def graph_builds(self) -> int:
        """Graph pairs built by this runtime (captures and compiles, or loads)."""
        return self._rt.graphs.builds

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle, torch.save) starts clean: compiled code does not
        # pickle, and graphs hold the original's weights. Its first call of each input
        # signature builds graphs again, from the copy's own weights.
        state = super().__getstate__()
        state.pop("_rt", None)
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
        return self._rt.planner

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
        state = Generation(scheduler, self._rt.epoch, self._spec.timestep_divisor)
        token = self._rt.current.set(state)
        try:
            yield state
        finally:
            self._rt.current.reset(token)

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
        if self.deepcache_config.blocks is not None:
            config = config.for_transformer()
        if config.cut != self.deepcache_config.cut:
            raise ValueError(
                f"this runtime's graphs are cut at {_cut_name(self.deepcache_config)}; {_cut_name(config)} "
                "needs its own graphs: dcfx.compile(runtime.model, ...) again"
            )
        if config.schedule_spec.needs_step_count() and self.scheduler is None:
            raise ValueError(
                f"the {config.schedule} schedule needs the step count: set steps= (this runtime has no scheduler)"
            )
        rt = self._rt
        forecast_changed = config.forecast_spec.forecasts != rt.forecasting
        with rt.lock:
            self.deepcache_config = config
            rt.planner = Planner(config)
            rt.epoch += 1
            rt.forecasting = config.forecast_spec.forecasts
        if forecast_changed:
            rt.graphs.drop()  # the forecast graph is built with the pair, when forecasting
        return self

    def clear_graphs(self) -> None:
        """Drops every built graph pair; the next call of each input signature builds again.

        Changes to the model are followed without it (see the class docstring), except
        writes through ``param.data``, which PyTorch does not count as a change of the
        parameter: call this after those when a backend copies the weights (Inductor).
        Every generation starts anew at its next call.
        """
        self._rt.graphs.drop()
        self._rt.epoch += 1

    def __del__(self) -> None:
        # A runtime dropped without clear_graphs() still lets go of what its graphs keep
        # outside it (torch.fx's copy of their generated source).
        rt = self.__dict__.get("_rt")
        if rt is not None and rt.graphs.pairs:
            rt.graphs.drop()

    def _state(self) -> Generation:
        rt = self._rt
        state = rt.current.get()
        if state is None:
            state = getattr(rt.local, "state", None)
            if state is None:
                state = rt.local.state = Generation(self.scheduler, rt.epoch, self._spec.timestep_divisor)
        return state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the U-Net call ``model(*args, **kwargs)`` as a full or a shallow step.

        Raises:
            TypeError, ValueError: bad inputs (checked once per input signature), naming the
                bad value and what the model takes; nothing changes.
            RuntimeError: the same ``generation()`` state is inside a call in another thread.
        """
        state = self._state()
        state.enter()
        try:
            return self._step(state, args, kwargs)
        finally:
            state.leave()

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
        names, tensors, _, _, _ = self._flatten(args, kwargs)
        graphs = self._rt.graphs
        key = graphs.signature(names, tensors)
        graphs.check_model()
        return graphs.get(key, names, tensors, self._rt.forecasting), tensors

    def _flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        form = (len(args), tuple(kwargs))
        binder = self._rt.binders.get(form)
        if binder is None:
            binder = self._rt.binders[form] = self._spec.binder(self.model, *form)
        return binder.flatten(args, kwargs)

    def _step(self, state: Generation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rt = self._rt
        names, tensors, return_dict, timestep, value = self._flatten(args, kwargs)
        key = rt.graphs.signature(names, tensors)
        index, saved = state.advance(rt.epoch, timestep, value, rt.planner, rt.graphs.check_model)
        try:
            pair = rt.graphs.get(key, names, tensors, rt.forecasting)
        except BaseException:
            state.restore(saved)
            raise
        # With forecasting, the step's place on the sampler's time axis: a forecast from the
        # last two full steps moves the feature by how far the timestep moved.
        position = state.position(index, timestep, value) if rt.forecasting else 0.0
        # A cache made by other graphs or for other inputs is stale (one ranged pair serves
        # many sizes: its cache fits only calls of the size that made it).
        source = (pair, key)
        decision = state.plan.decide(index, position, source)
        sample = state.run(decision, pair, source, tensors, position)
        with rt.lock:
            rt.stats["full" if decision.full else "shallow"] += 1
        return self._spec.output(sample, return_dict)


def _new_runtime(cls: type[DeepCacheUNet]) -> DeepCacheUNet:
    """Returns an empty runtime for unpickling to fill (``__setstate__``)."""
    return cls.__new__(cls)


def _cut_name(config: DeepCacheConfig) -> str:
    blocks = config.blocks
    return f"branch {config.branch}" if blocks is None else f"first={blocks[0]}, last={blocks[1]}"
