"""One tick's graph calls of a cohort: which generations run in which call, their inputs and graphs.

``CallBuilder.plan`` splits a cohort's generations into one full call and one shallow call
per forecast coefficient (each generation's plan, ``dcfx.planner``, decides its step), makes
each call's inputs at its padded batch size, and fetches its graph pair from the runtime,
so that every call of the tick is ready before the first one runs. It also tracks the graph
*epoch*: when the runtime rebuilt a pair, cache rows of the old graphs are not read again.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from dcfx.backends import CompiledPair
from dcfx.limits import MAX_GRAPH_PAIRS
from dcfx.planner import Decision
from dcfx.runtime import DeepCacheUNet
from dcfx.scalars import scalar
from dcfx.serve.cohorts import Cohort, Generation
from dcfx.serve.config import EngineConfig
from dcfx.serve.rows import CacheGroup, Rows, Slot, offsets, release

logger = logging.getLogger("dcfx.serve.engine")  # the engine's part: logged as the engine

Call = tuple[list[Generation], Callable[[], None]]  # the generations of a call, and what runs it


class CallBuilder:
    """Builds the calls of a cohort's tick on ``runtime``, and counts them.

    Args:
        runtime: The dcfx runtime whose graph pairs the calls run.
        config: How the engine batches (its batch sizes).
        counts: The engine's counters; calls, padded rows and cache copies are added to them.
        lock: The lock the engine reads ``counts`` and ``rows`` under.
    """

    def __init__(
        self,
        runtime: DeepCacheUNet,
        config: EngineConfig,
        counts: collections.Counter[str],
        lock: threading.Condition,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.counts = counts
        self.lock = lock
        self.epoch = 0  # moves when the runtime rebuilt graphs: the source of valid cache rows (dcfx.planner)
        self.rows: dict[str, collections.Counter[int]] = {  # live rows per call -> calls
            "full": collections.Counter(),
            "shallow": collections.Counter(),
        }
        self._signatures: set[tuple[object, ...]] = set()

    def plan(self, cohort: Cohort) -> list[Call]:
        """Returns this tick's calls of ``cohort``, inputs made, graphs built.

        Each generation's plan decides its step (``dcfx.planner``, the runtime's rules): the full
        steps run as one call, the shallow steps as one call per forecast coefficient (one in
        all while the cohort is in phase and the timesteps evenly spaced). A generation whose
        step reads the newest feature as it is rides in a forecast call with that feature as
        its previous one too: ``f + c (f - f)`` is ``f``.
        """
        for _ in range(4):
            epoch = self.epoch
            full: list[tuple[Generation, Decision]] = []
            reads: dict[float | None, list[tuple[Generation, Decision]]] = {}
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
            if self.epoch == epoch:
                return calls  # no graphs were rebuilt while resolving them: every cache row is current
        raise RuntimeError(
            "the runtime rebuilt graphs on every try: more graph signatures are in use than it keeps "
            f"(MAX_GRAPH_PAIRS = {MAX_GRAPH_PAIRS}); use fewer batch_sizes or sizes"
        )

    def graphs(
        self, cohort: Cohort, inputs: dict[str, Any], padded: int
    ) -> tuple[CompiledPair, tuple[torch.Tensor, ...]]:
        """Returns the runtime's graph pair for ``inputs`` and their flat inputs; moves the epoch on a rebuild."""
        pair, flat = self.runtime.graphs_for(**inputs)
        seen = cohort.pairs.get(padded)
        if seen is not None and seen is not pair:
            # The runtime built this batch size's graphs again: the model changed (or the pair
            # was evicted). Cache rows of the old graphs are not trusted: full steps next.
            logger.warning("dcfx.serve: graphs were rebuilt; cohort generations take a full step next")
            self.epoch += 1
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

    def _prepare_full(self, cohort: Cohort, full: list[tuple[Generation, Decision]]) -> Callable[[], None]:
        gens = [g for g, _ in full]
        layout: list[Slot] = [(g, g.rows) for g in gens]
        padded = self.config.padded(sum(g.rows for g in gens))
        pair, inputs = self.graphs(cohort, call_inputs(layout, padded, gens[0]), padded)

        def run() -> None:
            epoch = self.epoch
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
        self, cohort: Cohort, shallow: list[tuple[Generation, Decision]], coefficient: float | None
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
        pair, inputs = self.graphs(cohort, call_inputs(layout, padded, gens[0]), padded)
        forecasts = {id(g) for g, d in shallow if d.coefficient is not None}

        def newest(gen: Generation) -> Rows:
            return gen.plan.newest.payload

        def previous(gen: Generation) -> Rows:
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
        self, cohort: Cohort, layout: list[Slot], padded: int, rows_of: Callable[[Generation], Rows], name: str
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
        self.counts["cache_copies"] += 1
        return scratch[:padded]

    def _record(self, kind: str, layout: list[Slot], padded: int, forecast: bool = False) -> None:
        live = sum(n for g, n in layout if g is not None)
        with self.lock:
            self.counts[f"{kind}_calls"] += 1
            self.counts["forecast_calls"] += forecast
            self.counts["padded_rows"] += padded - live
            self.rows[kind][live] += 1


def call_inputs(layout: list[Slot], padded: int, like: Generation) -> dict[str, Any]:
    """Returns the model's keyword inputs of a call: each slot's rows, then padding to ``padded``.

    The sample goes by the model's name for it, the timestep divided as its pipelines divide
    it; inputs every row shares (``PreparedRequest.shared``) once, as ``like`` has them. A
    conditioning name ``outer.inner`` is the entry ``inner`` of the dict input ``outer`` (SDXL's
    ``added_cond_kwargs``).
    """
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
    prepared = like.prepared
    timestep = torch.cat(times).to(device)
    if prepared.timestep_divisor != 1:
        timestep = timestep.to(like.x.dtype) / prepared.timestep_divisor
    inputs = {prepared.sample_input: torch.cat(samples), "timestep": timestep}
    for name, values in conds.items():  # "added_cond_kwargs.time_ids": an entry of a dict input
        outer, dot, inner = name.partition(".")
        if dot:
            inputs.setdefault(outer, {})[inner] = torch.cat(values)
        else:
            inputs[name] = torch.cat(values)
    inputs.update(prepared.shared)
    return inputs
