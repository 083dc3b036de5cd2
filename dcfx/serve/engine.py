"""The step-batching engine: many generations, one full and one shallow graph call per tick.

Every active generation advances one denoising step per *tick*. The generations of a
*cohort* (the same scheduler, sample size and conditioning shapes) whose step is full run as
one batched call of the full graph; those whose step is shallow as one batched call of the
shallow graph. A full call writes the cache rows of its generations into one buffer (a
*cache group*); their shallow steps read those rows in place.

Phase alignment is what makes this pay: a generation's full steps come every N steps from
its first, so generations that started on the same tick modulo N share their full ticks, and
a cohort in one phase runs one full call every N ticks and a shallow call on the others,
as a single generation does. A new request starts with a full step; the engine admits it on
the tick of the cohort's next full step, where that step and the cohort's coincide, or at
once when waiting would take more than ``max_wait`` ticks (its own full call then, and a
phase of its own). Cache rows are not copied while a cohort is unchanged: a shallow call
whose generations all come from one full call reads that call's buffer as it is (rows of
generations that finished meanwhile ride along as padding until the next full step). Only
a shallow call that gathers generations of several phases copies their rows together.

Calls run at a few fixed batch sizes (``EngineConfig.batch_sizes``): a call of n rows is
padded to the smallest size >= n. Each batch size is a graph pair of its own while the
runtime's pairs have static shapes (at most ``dcfx.limits.MAX_GRAPH_PAIRS`` are kept), so
a few sizes keep the builds few at the price of padded rows; with a dynamic-batch pair,
``batch_sizes=range(1, max_batch + 1)`` pads nothing.

Rows are independent in a U-Net (no op mixes them), so a request's images do not depend on
what it is batched with, up to the kernels' rounding: on this CPU MKL and oneDNN pick other
kernels by batch size (a GEMM with one row is a GEMV; oneDNN convolutions take another path
for a batch of 1), which moves a step's output by ~1e-6. Requests batched at one padded size
equal the same request run alone at that size bit for bit (tests/serve/test_engine.py).

The parts: ``EngineConfig`` (dcfx.serve.config), the generations in flight and their
cohorts (dcfx.serve.cohorts), the calls of a cohort's tick (dcfx.serve.calls) and the cache
rows they write and read (dcfx.serve.rows); ``Engine`` here queues, admits and ticks.

Example:
    >>> runtime = dcfx.compile(model.unet, branch=0, interval=5)
    >>> engine = Engine(runtime, DigitsServeModel(model), EngineConfig(max_batch=16))
    >>> futures = [engine.submit(GenerationRequest(labels=(d,), seed=d)) for d in range(10)]
    >>> engine.run_until_idle()
    >>> images = [f.result().latents for f in futures]
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from dcfx.config import DeepCacheConfig
from dcfx.runtime import DeepCacheUNet
from dcfx.serve.calls import CallBuilder, call_inputs
from dcfx.serve.cohorts import Cohort, Generation, cohort_key
from dcfx.serve.config import EngineConfig
from dcfx.serve.models import ServeModel
from dcfx.serve.request import EngineStopped, GenerationRequest, GenerationResult, QueueFull
from dcfx.serve.rows import release
from dcfx.serve.settings import Settings

__all__ = ["Engine", "EngineConfig"]

logger = logging.getLogger(__name__)

_COUNTERS = (
    "ticks",
    "full_calls",
    "shallow_calls",
    "forecast_calls",
    "padded_rows",
    "cache_copies",
    "submitted",
    "completed",
    "failed",
    "rejected",
    "admitted_aligned",
    "admitted_at_once",
)


class Engine:
    """Runs many generations on one dcfx runtime, batching their steps tick by tick.

    Drive it offline with ``run_until_idle()`` (or ``tick()``), or in a thread of its own
    with ``start()`` / ``close()`` (a server). ``submit`` is thread-safe.

    Args:
        runtime: A ``dcfx.compile`` runtime of ``model.unet`` (its branch and schedule are used).
        model: What requests mean for the model (``DigitsServeModel``, ``UNetServeModel``).
        config: How to batch.
        choices: The (interval, forecast) settings requests may ask for
            (``GenerationRequest.interval`` / ``forecast``), as ``DeepCacheConfig``s that cut
            where the runtime does: one graph pair serves them all. The first is the default
            of requests that name none; the runtime's own setting is always offered (and is
            the default when ``choices`` is empty). Requests of one setting share cohorts.
            A forecasting choice needs a runtime compiled with a forecast (its graphs).
    """

    def __init__(
        self,
        runtime: DeepCacheUNet,
        model: ServeModel,
        config: EngineConfig | None = None,
        choices: Iterable[DeepCacheConfig] = (),
    ) -> None:
        if not isinstance(runtime, DeepCacheUNet):
            raise TypeError(f"runtime must be a dcfx runtime (dcfx.compile(unet, ...)), got {type(runtime).__name__}")
        if runtime.model is not model.unet:
            raise ValueError("runtime must wrap model.unet: dcfx.compile(model.unet, ...)")
        self.model = model
        self.config = config or EngineConfig()
        self.settings = Settings(runtime, choices)
        self._pending: collections.deque[Generation] = collections.deque()
        self._cohorts: dict[tuple[Any, ...], Cohort] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._ticking = threading.Lock()
        self._tick = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._drain = True
        # Every key present from the start: stats() copies the counters while the loop counts.
        self._counts: collections.Counter[str] = collections.Counter(dict.fromkeys(_COUNTERS, 0))
        self._calls = CallBuilder(runtime, self.config, self._counts, self._lock)

    @property
    def runtime(self) -> DeepCacheUNet:
        """The dcfx runtime whose graphs the engine's calls run."""
        return self._calls.runtime

    @runtime.setter
    def runtime(self, runtime: DeepCacheUNet) -> None:
        self._calls.runtime = runtime

    # ---- requests -------------------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, on_step: Callable[[int, int, bool], None] | None = None
    ) -> Future[GenerationResult]:
        """Queues ``request``; returns the future of its result.

        ``on_step(step, steps, full)`` is called in the engine's thread after each of its
        steps (``step`` counts from 1; ``full``: the step ran the full graph); it must not block.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting (at once, never a wait).
            EngineStopped: the engine is closing.
            ValueError, TypeError: a request the model or this engine cannot run, naming why.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit takes a GenerationRequest, got {type(request).__name__}")
        self.model.check_scheduler(request.scheduler)
        prepared = self.model.prepare(request)
        if prepared.rows > self.config.max_batch:
            raise ValueError(
                f"the request needs {prepared.rows} U-Net rows per step, more than max_batch {self.config.max_batch}"
            )
        setting, plan = self.settings.start(request.interval, request.forecast, request.steps)
        key = (*cohort_key(request, prepared), setting)
        future: Future[GenerationResult] = Future()
        scheduler = self.model.scheduler(request.scheduler)
        gen = Generation(next(self._ids), request, prepared, scheduler, plan, key, future, self._tick)
        gen.on_step = on_step
        future.request_id = gen.id  # type: ignore[attr-defined]
        with self._lock:
            if self._closing:
                raise EngineStopped("the engine is shutting down and takes no new requests")
            if len(self._pending) >= self.config.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(
                    f"the queue is full ({len(self._pending)} requests waiting, max_queue={self.config.max_queue}); "
                    "retry later"
                )
            gen.arrived_tick = self._tick
            self._pending.append(gen)
            self._counts["submitted"] += 1
            self._lock.notify_all()
        return future

    def choices(self) -> list[tuple[int, str]]:
        """Returns the (interval, forecast) settings requests may ask for, the default first."""
        return self.settings.choices()

    def setting(self, interval: int | None = None, forecast: str | None = None) -> tuple[int, str]:
        """Returns the setting a request asking for these runs (ValueError: not offered, naming those that are)."""
        return self.settings.resolve(interval, forecast)

    def run(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Returns the results of ``requests``, submitted together and run to completion here."""
        futures = [self.submit(r) for r in requests]
        self.run_until_idle()
        return [f.result() for f in futures]

    def warmup(self, request: GenerationRequest, batch_sizes: Sequence[int] | None = None) -> None:
        """Builds the graph pairs that requests like ``request`` need at each batch size, before serving."""
        prepared = self.model.prepare(request)
        scheduler = self.model.scheduler(request.scheduler)
        key = cohort_key(request, prepared)
        plan = self.runtime.planner.start(request.steps)
        gen = Generation(-1, request, prepared, scheduler, plan, key, Future(), self._tick)
        cohort = Cohort(key, self.config.max_batch)
        with torch.no_grad():
            for size in batch_sizes or self.config.batch_sizes:
                self._calls.graphs(cohort, call_inputs([(None, 0)], size, gen), size)

    # ---- the loop -------------------------------------------------------------------------

    def tick(self) -> bool:
        """Runs one tick: admits what may start, then each cohort's full and shallow calls.

        Returns whether there was anything to run.

        Raises:
            RuntimeError: another thread is inside ``tick`` (one driver at a time).
        """
        if not self._ticking.acquire(blocking=False):
            raise RuntimeError("Engine.tick is running in another thread: drive an engine from one thread")
        try:
            with self._lock:
                self._admit()
            cohorts = [c for c in self._cohorts.values() if c.running]
            if not cohorts:
                return False
            with torch.no_grad():
                for cohort in cohorts:
                    self._run_cohort(cohort)
            self._tick += 1
            self._counts["ticks"] += 1
            return True
        finally:
            self._ticking.release()

    def run_until_idle(self) -> None:
        """Ticks until no request is running or waiting."""
        while self.tick():
            pass

    def start(self) -> None:
        """Runs the engine in a thread of its own until ``close``."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._loop, name="dcfx-serve-engine", daemon=True)
        self._thread.start()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with ``drain`` finishes those it has, else fails them (``EngineStopped``).

        Returns when the engine's thread has stopped (or after ``timeout`` seconds; what is
        then still unfinished fails).
        """
        with self._lock:
            self._closing = True
            self._drain = drain
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._lock:
                    self._drain = False
                self._thread.join()
        elif drain:
            self.run_until_idle()
        self._fail_all(EngineStopped("the engine stopped before this request finished"))

    @property
    def alive(self) -> bool:
        """Whether the engine's thread runs (False before ``start`` and after ``close``)."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._pending and not self._busy():
                    self._lock.wait()
                if self._closing and not (self._drain and (self._pending or self._busy())):
                    return
            try:
                self.tick()
            except Exception as e:  # a bug in the engine itself: fail what it holds, keep serving
                logger.exception("dcfx.serve: a tick failed")
                self._fail_all(e)

    def _busy(self) -> bool:
        return any(c.running for c in self._cohorts.values())

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            gens = list(self._pending) + [g for c in self._cohorts.values() for g in c.running]
            self._pending.clear()
            for cohort in self._cohorts.values():
                for gen in cohort.running:
                    release(gen.plan.drop())
                cohort.running.clear()
        for gen in gens:
            if not gen.future.done():
                self._counts["failed"] += 1
                gen.future.set_exception(error)

    # ---- admission --------------------------------------------------------------------------

    def _admit(self) -> None:
        """Moves waiting requests into their cohorts where the policy lets them start this tick."""
        cfg = self.config
        blocked: set[tuple[Any, ...]] = set()
        busy_before = {key for key, c in self._cohorts.items() if c.running}
        kept: collections.deque[Generation] = collections.deque()
        while self._pending:
            gen = self._pending.popleft()
            cohort = self._cohorts.get(gen.key)
            if cohort is None:
                cohort = self._cohorts[gen.key] = Cohort(gen.key, cfg.max_batch)
            if gen.key in blocked or cohort.rows + gen.rows > cfg.max_batch:
                blocked.add(gen.key)  # first come, first served within a cohort
                kept.append(gen)
                continue
            if cfg.batching == "request":
                if gen.key in busy_before:
                    kept.append(gen)
                    continue
            else:
                wait = cohort.ticks_to_next_full()
                waited = self._tick - gen.arrived_tick
                late = cfg.max_wait is not None and waited + (wait or 0) > cfg.max_wait
                if wait not in (None, 0) and not late:
                    kept.append(gen)  # waits for the cohort's next full step
                    continue
                self._counts["admitted_aligned" if wait is not None and not late else "admitted_at_once"] += 1
            gen.start_tick = self._tick
            cohort.running.append(gen)
        self._pending = kept

    # ---- calls ------------------------------------------------------------------------------

    def _run_cohort(self, cohort: Cohort) -> None:
        try:
            calls = self._calls.plan(cohort)
        except Exception as e:  # a graph build failed: nothing ran
            logger.exception("dcfx.serve: building the graphs of cohort %s failed; its generations fail", cohort.key)
            self._drop(cohort, list(cohort.running), e)
            return
        before = {gen: gen.full_steps for gen in cohort.running if gen.on_step is not None}
        for gens, run in calls:
            try:
                run()
            except Exception as e:
                logger.exception("dcfx.serve: a call of cohort %s failed; its generations fail", cohort.key)
                self._drop(cohort, [g for g in gens if g in cohort.running], e)
        for gen, full_before in before.items():
            if gen in cohort.running:
                try:
                    gen.on_step(gen.step, gen.steps, gen.full_steps > full_before)
                except Exception:  # a listener's bug must not stop the generation
                    logger.exception("dcfx.serve: an on_step callback failed")
        for gen in [g for g in cohort.running if g.step == g.steps]:
            self._finish(cohort, gen)

    def _finish(self, cohort: Cohort, gen: Generation) -> None:
        cohort.running.remove(gen)
        release(gen.plan.drop())
        result = GenerationResult(
            request_id=gen.id,
            latents=self.model.finish(gen.x),
            full_steps=gen.full_steps,
            shallow_steps=gen.shallow_steps,
            waited_ticks=gen.start_tick - gen.arrived_tick,
            start_tick=gen.start_tick,
            end_tick=self._tick,
            submitted_s=gen.submitted_s,
            finished_s=time.perf_counter(),
        )
        with self._lock:
            self._counts["completed"] += 1
        gen.future.set_result(result)

    def _drop(self, cohort: Cohort, gens: list[Generation], error: BaseException) -> None:
        for gen in gens:
            cohort.running.remove(gen)
            release(gen.plan.drop())
            with self._lock:
                self._counts["failed"] += 1
            gen.future.set_exception(error)

    # ---- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Returns counters: queue length, running generations, calls, their batch sizes, copies.

        ``full_rows`` / ``shallow_rows`` map live rows per call to the number of such calls;
        ``padded_rows`` counts rows run as padding; ``cache_copies`` counts shallow calls that
        gathered cache rows from several full calls (none while every cohort is in one phase).
        """
        with self._lock:
            counts = dict(self._counts)
            return {
                "queue": len(self._pending),
                "running": sum(len(c.running) for c in self._cohorts.values()),
                "cohorts": sum(1 for c in self._cohorts.values() if c.running),
                "ticks": counts.get("ticks", 0),
                "full_calls": counts.get("full_calls", 0),
                "shallow_calls": counts.get("shallow_calls", 0),
                "forecast_calls": counts.get("forecast_calls", 0),
                "full_rows": dict(sorted(self._calls.rows["full"].items())),
                "shallow_rows": dict(sorted(self._calls.rows["shallow"].items())),
                "padded_rows": counts.get("padded_rows", 0),
                "cache_copies": counts.get("cache_copies", 0),
                "cache_buffers": sum(c.pool.allocated for c in self._cohorts.values()),
                "submitted": counts.get("submitted", 0),
                "completed": counts.get("completed", 0),
                "failed": counts.get("failed", 0),
                "rejected": counts.get("rejected", 0),
                "admitted_aligned": counts.get("admitted_aligned", 0),
                "admitted_at_once": counts.get("admitted_at_once", 0),
            }
