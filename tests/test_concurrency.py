"""One runtime, many generations at once: per-generation state, and no lock on the step path.

Each thread has its own generation (step tracking and cache) by default; ``generation()`` gives
a block of code one of its own (async servers, pipelines with their own schedulers). The graphs
and weights are shared; graph builds take turns, and the steps of built graphs go on meanwhile.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.fixtures import example_call, tiny_sd, wrap_build

STEPS = 6


@pytest.fixture(scope="module")
def unet():
    return tiny_sd()


def denoise(runtime, call, seed: int, scheduler=None, steps: int = STEPS) -> torch.Tensor:
    """A DDIM loop from seeded noise; returns the final latents."""
    scheduler = scheduler or DDIMScheduler()
    scheduler.set_timesteps(steps)
    x = torch.randn(call["sample"].shape, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        eps = runtime(**dict(call, sample=x, timestep=t)).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


JOBS = [  # (batch, size, seed): mixed shapes
    (1, 16, 0),
    (2, 16, 1),
    (1, 24, 2),
    (2, 24, 3),
    (1, 16, 4),
]


@pytest.mark.slow
def test_four_threads_five_generations_each_equal_their_solo_runs(unet):
    calls = {(b, s): example_call(unet, batch=b, size=s) for b, s, _ in JOBS}
    alone = dcfx.compile(unet, branch=0, interval=3)
    want = {(b, s, seed): denoise(alone, calls[b, s], seed) for b, s, seed in JOBS}
    shared = dcfx.compile(unet, branch=0, interval=3)
    results: dict[tuple[int, tuple[int, int, int]], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(w: int) -> None:
        try:
            start.wait()
            for j in range(len(JOBS)):
                b, s, seed = JOBS[(j + w) % len(JOBS)]  # each thread in its own order
                if w < 2:  # the thread's own generation, steps counted by timestep
                    results[w, (b, s, seed)] = denoise(shared, calls[b, s], seed)
                else:  # a generation() block with its own scheduler, as a pipeline per thread has
                    scheduler = DDIMScheduler()
                    with shared.generation(scheduler=scheduler):
                        results[w, (b, s, seed)] = denoise(shared, calls[b, s], seed, scheduler)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 4 * len(JOBS)
    for (_, job), got in results.items():
        torch.testing.assert_close(got, want[job], atol=0, rtol=0)
    full = 2 * 4 * len(JOBS)  # steps 0 and 3 of 6
    assert shared.stats == {"full": full, "shallow": STEPS * 4 * len(JOBS) - full}
    assert shared.graph_builds == 4  # one pair per shape, shared by every thread


def test_steps_go_on_while_another_thread_builds_graphs(unet):
    runtime = dcfx.compile(unet, branch=0, interval=3)
    call = example_call(unet, batch=1, size=16)
    want = denoise(runtime, call, seed=0)  # graphs of this shape built
    building, built = threading.Event(), threading.Event()

    def slow_build(build, names, tensors, **kwargs):
        building.set()
        pair = build(names, tensors, **kwargs)
        time.sleep(1.0)  # a build that takes a while (SD1.5 under Inductor: minutes)
        built.set()
        return pair

    wrap_build(runtime, slow_build)
    during: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def stepper() -> None:
        try:
            assert building.wait(timeout=120)
            while not built.is_set():
                during.append(denoise(runtime, call, seed=0))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=stepper)
    thread.start()
    other = example_call(unet, batch=2, size=24)
    runtime(**other)  # builds the new shape in this thread
    thread.join(timeout=120)
    assert not errors, errors
    assert len(during) >= 2, "the steps waited for the build"
    for got in during:
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_generations_interleaved_on_one_thread_keep_their_caches(unet):
    runtime = dcfx.compile(unet, branch=0, interval=3)
    calls = [example_call(unet, batch=1, size=16), example_call(unet, batch=2, size=24)]
    want = [denoise(runtime, call, seed) for seed, call in enumerate(calls)]
    schedulers = [DDIMScheduler(), DDIMScheduler()]
    blocks = [runtime.generation(scheduler=s) for s in schedulers]
    states = [block.__enter__() for block in blocks]
    try:
        xs = []
        for seed, (call, s) in enumerate(zip(calls, schedulers, strict=True)):
            s.set_timesteps(STEPS)
            xs.append(torch.randn(call["sample"].shape, generator=torch.Generator().manual_seed(seed)))
        for i in range(STEPS):  # step i of one generation, then step i of the other
            for g, (call, s) in enumerate(zip(calls, schedulers, strict=True)):
                runtime._rt.current.set(states[g])  # what entering each request's block does in a server
                t = s.timesteps[i]
                eps = runtime(**dict(call, sample=xs[g], timestep=t)).sample
                xs[g] = s.step(eps, t, xs[g]).prev_sample
    finally:
        for block in reversed(blocks):
            block.__exit__(None, None, None)
    for got, expected in zip(xs, want, strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert states[0].cache is not states[1].cache  # two generations never share a cache


def test_reset_in_one_thread_leaves_the_others_generation_alone(unet):
    runtime = dcfx.compile(unet, branch=0, interval=3)
    call = example_call(unet, batch=1, size=16)
    want = denoise(runtime, call, seed=0)
    step_two, resumed = threading.Event(), threading.Event()
    out: dict[str, torch.Tensor] = {}

    def other() -> None:
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(STEPS)
        x = torch.randn(call["sample"].shape, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(scheduler.timesteps):
            if i == 2:
                step_two.set()
                resumed.wait(timeout=60)
            eps = runtime(**dict(call, sample=x, timestep=t)).sample
            x = scheduler.step(eps, t, x).prev_sample
        out["x"] = x

    thread = threading.Thread(target=other)
    thread.start()
    assert step_two.wait(timeout=60)
    runtime.reset()  # this thread's generation, not the other's
    resumed.set()
    thread.join(timeout=60)
    torch.testing.assert_close(out["x"], want, atol=0, rtol=0)


def test_one_generation_block_used_by_two_threads_at_once_is_refused(unet):
    runtime = dcfx.compile(unet, branch=0, interval=3)
    call = example_call(unet, batch=1, size=16)
    runtime(**call)  # graphs built
    inside, release = threading.Event(), threading.Event()
    pair = next(iter(runtime._rt.graphs.pairs.values()))
    full = pair.full

    def blocking_full(*args):
        inside.set()
        release.wait(timeout=60)
        return full(*args)

    object.__setattr__(pair, "full", blocking_full)
    with runtime.generation() as state:
        first = threading.Thread(target=lambda: (runtime._rt.current.set(state), runtime(**call)))
        first.start()
        assert inside.wait(timeout=60)
        with pytest.raises(RuntimeError, match=r"this dcfx generation is inside a call in another thread"):
            runtime(**dict(call, timestep=300))
        release.set()
        first.join(timeout=60)
    object.__setattr__(pair, "full", full)
    runtime.reset()
    assert runtime(**call).sample.shape == call["sample"].shape  # this thread's own state is untouched
