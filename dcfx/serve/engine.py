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
runtime's pairs have static shapes (at most ``dcfx.runtime.MAX_GRAPH_PAIRS`` are kept), so
a few sizes keep the builds few at the price of padded rows; with a dynamic-batch pair,
``batch_sizes=range(1, max_batch + 1)`` pads nothing.

Rows are independent in a U-Net (no op mixes them), so a request's images do not depend on
what it is batched with, up to the kernels' rounding: on this CPU MKL and oneDNN pick other
kernels by batch size (a GEMM with one row is a GEMV; oneDNN convolutions take another path
for a batch of 1), which moves a step's output by ~1e-6. Requests batched at one padded size
equal the same request run alone at that size bit for bit (tests/serve/test_engine.py).

Example:
    >>> runtime = dcfx.compile(model.unet, branch=0, interval=5)
    >>> engine = Engine(runtime, DigitsServeModel(model), EngineConfig(max_batch=16))
    >>> futures = [engine.submit(GenerationRequest(labels=(d,), seed=d)) for d in range(10)]
    >>> engine.run_until_idle()
    >>> images = [f.result().latents for f in futures]
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import torch

from dcfx.backends import CompiledPair
from dcfx.planner import Decision, GenerationPlan
from dcfx.runtime import MAX_GRAPH_PAIRS, DeepCacheUNet
from dcfx.scalars import scalar
from dcfx.serve.models import PreparedRequest, ServeModel
from dcfx.serve.request import EngineStopped, GenerationRequest, GenerationResult, QueueFull
from dcfx.serve.rows import BufferPool, CacheGroup, Rows, Slot, offsets, release

logger = logging.getLogger(__name__)

BATCHING = ("step", "request")
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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches.

    Attributes:
        max_batch: U-Net rows per cohort at most (a guided image takes two): every call holds
            at most this many live rows. Default: the largest of ``batch_sizes``, else 16.
        batch_sizes: The batch sizes calls are padded to. Default: the powers of two below
            ``max_batch``, and ``max_batch``.
        max_wait: Ticks a new request may wait for its cohort's next full step; when the
            wait would be longer it starts at once in a phase of its own. None: always wait
            (at most N - 1 ticks under a uniform 1:N schedule); 0: never wait (no alignment).
        max_queue: Requests waiting to start at most; one more is refused at once (``QueueFull``).
        batching: ``"step"`` (generations join and leave between steps) or ``"request"``
            (request-level batching: a cohort takes new requests only when it is empty, and
            runs them to completion together).
    """

    max_batch: int | None = None
    batch_sizes: tuple[int, ...] | None = None
    max_wait: int | None = None
    max_queue: int = 64
    batching: Literal["step", "request"] = "step"

    def __post_init__(self) -> None:
        if self.batch_sizes is not None:
            sizes = tuple(self.batch_sizes)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"batch_sizes must be ints >= 1, got {self.batch_sizes!r}")
            object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))
        max_batch = self.max_batch
        if max_batch is None:
            max_batch = self.batch_sizes[-1] if self.batch_sizes else 16
        _check_int("max_batch", max_batch, 1)
        object.__setattr__(self, "max_batch", max_batch)
        if self.batch_sizes is None:
            powers = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
            object.__setattr__(self, "batch_sizes", (*powers, max_batch))
        if self.batch_sizes[-1] < max_batch:
            raise ValueError(
                f"max_batch {max_batch} is larger than the largest of batch_sizes {list(self.batch_sizes)}: "
                "a call of max_batch rows needs a batch size to run at"
            )
        if self.max_wait is not None:
            _check_int("max_wait", self.max_wait, 0)
        _check_int("max_queue", self.max_queue, 0)
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")

    def padded(self, rows: int) -> int:
        """Returns the batch size a call of ``rows`` live rows runs at."""
        for size in self.batch_sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the largest batch size {self.batch_sizes[-1]}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


class _Generation:
    """One request in flight: its scheduler state, latents, step, and where its cache rows are."""

    def __init__(
        self,
        rid: int,
        request: GenerationRequest,
        prepared: PreparedRequest,
        scheduler: Any,
        plan: GenerationPlan,
        key: tuple[Any, ...],
        future: Future[GenerationResult],
        tick: int,
    ) -> None:
        self.id = rid
        self.request = request
        self.cond = prepared.conditioning
        self.rows = prepared.rows
        self.scheduler = scheduler
        scheduler.set_timesteps(request.steps)
        self.timesteps = list(scheduler.timesteps)  # 0-d tensors, as a pipeline's loop passes them
        self.positions = [float(t) for t in self.timesteps]  # the steps on the sampler's time axis
        self.x = prepared.noise * scheduler.init_noise_sigma
        self.plan = plan
        self.key = key
        self.future = future
        self.step = 0
        self.full_steps = 0
        self.shallow_steps = 0
        self.arrived_tick = tick
        self.start_tick = -1
        self.submitted_s = time.perf_counter()

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def position(self) -> float:
        """This step's place on the sampler's time axis (its timestep), as the runtime reads it."""
        return self.positions[self.step]

    def next_full(self) -> int | None:
        """Returns the steps until this generation's next full step (None: it has none left)."""
        step = self.plan.next_full(self.step, self.steps)
        return None if step is None else step - self.step

    def model_input(self) -> torch.Tensor:
        """Returns its U-Net rows of this step: (rows, C, H, W)."""
        x = self.scheduler.scale_model_input(self.x, self.timesteps[self.step])
        return torch.cat([x, x]) if self.request.guided else x

    def advance(self, eps: torch.Tensor) -> None:
        """Takes the scheduler step with the U-Net's output rows ``eps``."""
        if self.request.guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + self.request.guidance * (eps_cond - eps_uncond)
        self.x = self.scheduler.step(eps, self.timesteps[self.step], self.x).prev_sample
        self.step += 1


class _Cohort:
    """Generations that may share a call: one scheduler, sample size and conditioning layout."""

    def __init__(self, key: tuple[Any, ...], capacity: int) -> None:
        self.key = key
        self.running: list[_Generation] = []
        self.pool = BufferPool(capacity)
        self.scratch: dict[str, torch.Tensor] = {}  # anchor -> gathered cache rows of a shallow call
        self.pairs: dict[int, CompiledPair] = {}  # batch size -> the pair last used for it

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.running)

    def ticks_to_next_full(self) -> int | None:
        """Returns the ticks until some running generation takes a full step (None: none will)."""
        waits = [w for w in (g.next_full() for g in self.running) if w is not None]
        return min(waits) if waits else None


class Engine:
    """Runs many generations on one dcfx runtime, batching their steps tick by tick.

    Drive it offline with ``run_until_idle()`` (or ``tick()``), or in a thread of its own
    with ``start()`` / ``close()`` (a server). ``submit`` is thread-safe.

    Args:
        runtime: A ``dcfx.compile`` runtime of ``model.unet`` (its branch and schedule are used).
        model: What requests mean for the model (``DigitsServeModel``, ``UNetServeModel``).
        config: How to batch.
    """

    def __init__(self, runtime: DeepCacheUNet, model: ServeModel, config: EngineConfig | None = None) -> None:
        if not isinstance(runtime, DeepCacheUNet):
            raise TypeError(f"runtime must be a dcfx runtime (dcfx.compile(unet, ...)), got {type(runtime).__name__}")
        if runtime.model is not model.unet:
            raise ValueError("runtime must wrap model.unet: dcfx.compile(model.unet, ...)")
        self.runtime = runtime
        self.model = model
        self.config = config or EngineConfig()
        self._pending: collections.deque[_Generation] = collections.deque()
        self._cohorts: dict[tuple[Any, ...], _Cohort] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._ticking = threading.Lock()
        self._tick = 0
        self._epoch = 0  # moves when the runtime rebuilt graphs: the source of valid cache rows (dcfx.planner)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._signatures: set[tuple[Any, ...]] = set()
        self._drain = True
        # Every key present from the start: stats() copies the counters while the loop counts.
        self._counts: collections.Counter[str] = collections.Counter(dict.fromkeys(_COUNTERS, 0))
        self._rows: dict[str, collections.Counter[int]] = {
            "full": collections.Counter(),
            "shallow": collections.Counter(),
        }

    # ---- requests -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queues ``request``; returns the future of its result.

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
        plan = self.runtime.planner.start(request.steps)  # the runtime's planner: its schedule and forecast now
        key = _cohort_key(request, prepared)
        future: Future[GenerationResult] = Future()
        scheduler = self.model.scheduler(request.scheduler)
        gen = _Generation(next(self._ids), request, prepared, scheduler, plan, key, future, self._tick)
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

    def run(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Returns the results of ``requests``, submitted together and run to completion here."""
        futures = [self.submit(r) for r in requests]
        self.run_until_idle()
        return [f.result() for f in futures]

    def warmup(self, request: GenerationRequest, batch_sizes: Sequence[int] | None = None) -> None:
        """Builds the graph pairs that requests like ``request`` need at each batch size, before serving."""
        prepared = self.model.prepare(request)
        scheduler = self.model.scheduler(request.scheduler)
        key = _cohort_key(request, prepared)
        plan = self.runtime.planner.start(request.steps)
        gen = _Generation(-1, request, prepared, scheduler, plan, key, Future(), self._tick)
        cohort = _Cohort(key, self.config.max_batch)
        with torch.no_grad():
            for size in batch_sizes or self.config.batch_sizes:
                self._graphs(cohort, self._inputs([(None, 0)], size, gen), size)

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
        kept: collections.deque[_Generation] = collections.deque()
        while self._pending:
            gen = self._pending.popleft()
            cohort = self._cohorts.get(gen.key)
            if cohort is None:
                cohort = self._cohorts[gen.key] = _Cohort(gen.key, cfg.max_batch)
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

    def _run_cohort(self, cohort: _Cohort) -> None:
        try:
            calls = self._plan_calls(cohort)
        except Exception as e:  # a graph build failed: nothing ran
            logger.exception("dcfx.serve: building the graphs of cohort %s failed; its generations fail", cohort.key)
            self._drop(cohort, list(cohort.running), e)
            return
        for gens, run in calls:
            try:
                run()
            except Exception as e:
                logger.exception("dcfx.serve: a call of cohort %s failed; its generations fail", cohort.key)
                self._drop(cohort, [g for g in gens if g in cohort.running], e)
        for gen in [g for g in cohort.running if g.step == g.steps]:
            self._finish(cohort, gen)

    def _plan_calls(self, cohort: _Cohort) -> list[tuple[list[_Generation], Callable[[], None]]]:
        """Returns this tick's calls of ``cohort``, inputs made, graphs built.

        Each generation's plan decides its step (``dcfx.planner``, the runtime's rules): the full
        steps run as one call, the shallow steps as one call per forecast coefficient (one in
        all while the cohort is in phase and the timesteps evenly spaced). A generation whose
        step reads the newest feature as it is rides in a forecast call with that feature as
        its previous one too: ``f + c (f - f)`` is ``f``.
        """
        for _ in range(4):
            epoch = self._epoch
            full: list[tuple[_Generation, Decision]] = []
            reads: dict[float | None, list[tuple[_Generation, Decision]]] = {}
            for gen in cohort.running:
                decision = gen.plan.decide(gen.step, gen.position, epoch)
                if decision.full:
                    full.append((gen, decision))
                else:
                    reads.setdefault(decision.coefficient, []).append((gen, decision))
            if None in reads and len(reads) > 1:
                plain = reads.pop(None)
                reads[next(iter(reads))] += plain
            calls = []
            if full:
                calls.append(([g for g, _ in full], self._prepare_full(cohort, full)))
            for coefficient, shallow in reads.items():
                calls.append(([g for g, _ in shallow], self._prepare_shallow(cohort, shallow, coefficient)))
            if self._epoch == epoch:
                return calls  # no graphs were rebuilt while resolving them: every cache row is current
        raise RuntimeError(
            "the runtime rebuilt graphs on every try: more graph signatures are in use than it keeps "
            f"(MAX_GRAPH_PAIRS = {MAX_GRAPH_PAIRS}); use fewer batch_sizes or sizes"
        )

    def _prepare_full(self, cohort: _Cohort, full: list[tuple[_Generation, Decision]]) -> Callable[[], None]:
        gens = [g for g, _ in full]
        layout: list[Slot] = [(g, g.rows) for g in gens]
        padded = self.config.padded(sum(g.rows for g in gens))
        pair, inputs = self._graphs(cohort, self._inputs(layout, padded, gens[0]), padded)

        def run() -> None:
            epoch = self._epoch
            for gen, decision in full:
                release(gen.plan.begin_full(decision, epoch))  # rows no step reads any more may be reused now
            group = CacheGroup(layout, padded, cohort.pool)
            try:
                out, _ = pair.run_full(inputs, group.buffer_for)
            except BaseException:
                group.live = 0
                group.leave()  # its buffer goes back to the pool
                raise
            self._record("full", layout, padded)
            offset = 0
            for gen, rows in layout:
                gen.plan.end_full(gen.position, epoch, (group, offset))
                gen.full_steps += 1
                gen.advance(out[offset : offset + rows])
                offset += rows

        return run

    def _prepare_shallow(
        self, cohort: _Cohort, shallow: list[tuple[_Generation, Decision]], coefficient: float | None
    ) -> Callable[[], None]:
        gens = [g for g, _ in shallow]
        groups = {id(g.plan.newest.payload[0]): g.plan.newest.payload[0] for g in gens}
        members = {id(g) for g in gens}
        group: CacheGroup | None = None
        if len(groups) == 1:
            # One phase: the call takes its full call's layout and reads that buffer in place;
            # rows of generations not in this call (finished, or at a full step) are padding.
            group = next(iter(groups.values()))
            layout: list[Slot] = [(g if g is not None and id(g) in members else None, n) for g, n in group.layout]
            padded = group.padded
        else:
            layout = [(g, g.rows) for g in gens]
            padded = self.config.padded(sum(g.rows for g in gens))
        pair, inputs = self._graphs(cohort, self._inputs(layout, padded, gens[0]), padded)
        forecasts = {id(g) for g, d in shallow if d.coefficient is not None}

        def newest(gen: _Generation) -> Rows:
            return gen.plan.newest.payload

        def previous(gen: _Generation) -> Rows:
            return gen.plan.previous.payload if id(gen) in forecasts else gen.plan.newest.payload

        def run() -> None:
            cache = self._anchor_rows(cohort, layout, padded, newest, "newest")
            if coefficient is None:
                out = pair.run_shallow(inputs, cache)
            else:
                before = self._anchor_rows(cohort, layout, padded, previous, "previous")
                out = pair.run_forecast(inputs, cache, before, scalar(coefficient, torch.float32, cache.device))
            self._record("shallow", layout, padded, forecast=coefficient is not None)
            offset = 0
            for gen, rows in layout:
                if gen is not None:
                    gen.shallow_steps += 1
                    gen.advance(out[offset : offset + rows])
                offset += rows

        return run

    def _anchor_rows(
        self, cohort: _Cohort, layout: list[Slot], padded: int, rows_of: Callable[[_Generation], Rows], name: str
    ) -> torch.Tensor:
        """Returns the feature rows ``rows_of`` each generation of ``layout`` reads, at its place in it.

        In place when one full call wrote them all in this layout (a cohort in one phase);
        else copied together into the cohort's scratch buffer ``name``.
        """
        placed = [(gen, offset) for (gen, _), offset in zip(layout, offsets(layout), strict=True) if gen is not None]
        group, _ = rows_of(placed[0][0])
        if group.padded == padded and all(rows_of(g) == (group, offset) for g, offset in placed):
            return group.buffer
        first = group.buffer
        scratch = cohort.scratch.get(name)
        if scratch is None or scratch.shape[1:] != first.shape[1:] or scratch.stride() != first.stride():
            scratch = torch.empty_strided(
                (self.config.max_batch, *first.shape[1:]), first.stride(), dtype=first.dtype, device=first.device
            )
            cohort.scratch[name] = scratch = scratch.zero_()  # padding rows read it: finite, never stale memory
        for gen, offset in placed:
            source, row = rows_of(gen)
            scratch[offset : offset + gen.rows].copy_(source.buffer[row : row + gen.rows])
        self._counts["cache_copies"] += 1
        return scratch[:padded]

    def _inputs(self, layout: list[Slot], padded: int, like: _Generation) -> dict[str, torch.Tensor]:
        """Returns the U-Net keyword inputs of a call: each slot's rows, then padding to ``padded``."""
        samples, times = [], []
        conds: dict[str, list[torch.Tensor]] = {name: [] for name in like.cond}
        rows = 0
        for gen, n in [*layout, (None, padded - sum(n for _, n in layout))]:
            if n == 0:
                continue
            rows += n
            if gen is None:
                samples.append(like.x.new_zeros((n, *like.x.shape[1:])))
                times.append(torch.zeros(n))
                for name, value in like.cond.items():
                    conds[name].append(value.new_zeros((n, *value.shape[1:])))
                continue
            samples.append(gen.model_input())
            times.append(torch.full((n,), float(gen.timesteps[gen.step]), dtype=torch.float32))
            for name, value in gen.cond.items():
                conds[name].append(value)
        device = like.x.device
        inputs = {"sample": torch.cat(samples), "timestep": torch.cat(times).to(device)}
        inputs.update({name: torch.cat(values) for name, values in conds.items()})
        return inputs

    def _graphs(
        self, cohort: _Cohort, inputs: dict[str, torch.Tensor], padded: int
    ) -> tuple[CompiledPair, tuple[torch.Tensor, ...]]:
        pair, flat = self.runtime.graphs_for(**inputs)
        seen = cohort.pairs.get(padded)
        if seen is not None and seen is not pair:
            # The runtime built this batch size's graphs again: the model changed (or the pair
            # was evicted). Cache rows of the old graphs are not trusted: full steps next.
            logger.warning("dcfx.serve: graphs were rebuilt; cohort generations take a full step next")
            self._epoch += 1
        cohort.pairs[padded] = pair
        self._signatures.add((cohort.key, padded))
        if len(self._signatures) == MAX_GRAPH_PAIRS + 1:
            logger.warning(
                "dcfx.serve: more than %d graph signatures in use (cohorts x batch sizes): the runtime keeps %d "
                "graph pairs and rebuilds the others; use fewer batch_sizes",
                MAX_GRAPH_PAIRS,
                MAX_GRAPH_PAIRS,
            )
        return pair, flat

    def _record(self, kind: str, layout: list[Slot], padded: int, forecast: bool = False) -> None:
        live = sum(n for g, n in layout if g is not None)
        with self._lock:
            self._counts[f"{kind}_calls"] += 1
            self._counts["forecast_calls"] += forecast
            self._counts["padded_rows"] += padded - live
            self._rows[kind][live] += 1

    def _finish(self, cohort: _Cohort, gen: _Generation) -> None:
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

    def _drop(self, cohort: _Cohort, gens: list[_Generation], error: BaseException) -> None:
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
                "full_rows": dict(sorted(self._rows["full"].items())),
                "shallow_rows": dict(sorted(self._rows["shallow"].items())),
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


def _cohort_key(request: GenerationRequest, prepared: PreparedRequest) -> tuple[Any, ...]:
    sample = prepared.noise
    cond = tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in prepared.conditioning.items()))
    return (request.scheduler, tuple(sample.shape[1:]), sample.dtype, str(sample.device), cond)
