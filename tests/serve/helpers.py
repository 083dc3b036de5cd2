"""Drives an engine offline (requests submitted at given ticks, ticks run until all are done); holds
a batching stage busy so that what is submitted meanwhile waits for one call."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

from dcfx.serve import Engine, GenerationRequest, GenerationResult
from dcfx.serve.stages import BatchStage


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


@contextlib.contextmanager
def held(stage: BatchStage, item: object) -> Iterator[None]:
    """Keeps ``stage`` inside a call on ``item`` until the block ends.

    The stage's thread has taken ``item`` and waits when the block starts, so everything
    submitted inside the block is pending together when it ends: the stage's next call takes it
    all (up to ``max_items``). A future's done callback cannot do this: a call that finished
    before the callback was added runs it in the caller's thread instead.
    """
    run, started, release = stage._run, threading.Event(), threading.Event()

    def run_held(items: list) -> list:
        if items[0] is item:
            started.set()
            release.wait(60)
        return run(items)

    stage._run = run_held
    try:
        held_call = stage.submit(item)
        assert started.wait(60), f"the {stage.name} stage did not start the held call"
        yield
    finally:
        release.set()
        stage._run = run
    held_call.result(timeout=60)
