"""Drives an engine offline: requests submitted at given ticks, ticks run until all are done."""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import Future

from dcfx.serve import Engine, GenerationRequest, GenerationResult


def drive(engine: Engine, arrivals: Sequence[tuple[int, GenerationRequest]]) -> list[GenerationResult]:
    """Submits each request on its tick (ticks counted from 0 here) and runs until all finish."""
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    futures: dict[int, Future[GenerationResult]] = {}
    tick = 0
    while len(futures) < len(arrivals) or not all(f.done() for f in futures.values()):
        for i in order:
            if i not in futures and arrivals[i][0] <= tick:
                futures[i] = engine.submit(arrivals[i][1])
        engine.tick()
        tick += 1
        assert tick < 10_000, "the engine made no progress"
    return [futures[i].result() for i in range(len(arrivals))]


def random_arrivals(
    requests: Sequence[GenerationRequest], seed: int, spread: int
) -> list[tuple[int, GenerationRequest]]:
    """Returns the requests with arrival ticks drawn uniformly from [0, spread)."""
    rng = random.Random(seed)
    return [(rng.randrange(spread), r) for r in requests]
