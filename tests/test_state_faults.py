"""State faults: whatever happens between or inside generations, no result comes from a stale
or foreign cache, and the next generation equals a fresh one.

Exceptions inside a step and inside a pipeline, abandoned generations, shape changes, reset()
at every step, copies and moves, replaced weights, and threads.
"""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx.schedule import full_step_indices
from tests.fixtures import example_call, make_sd_pipeline, run_sd, tiny_sd, tiny_unet, wrap_build
from tests.test_runtime import Recorder

STEPS = 8


@pytest.fixture(scope="module")
def unet():
    return tiny_sd()


def loop(fast, scheduler, call, steps=STEPS, on_step=None):
    """A DDIM loop over ``call``'s inputs; returns the final latents. ``on_step(i)`` runs before step i."""
    scheduler.set_timesteps(steps)
    x = call["sample"]
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i)
        eps = fast(**dict(call, sample=x, timestep=t)).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


_FRESH: dict = {}


def fresh(unet, call, **config):
    """The final latents of a new runtime's first generation (cached per model, config and shape)."""
    key = (id(unet), tuple(sorted(config.items())), tuple(call["sample"].shape))
    if key not in _FRESH:
        scheduler = DDIMScheduler()
        _FRESH[key] = (unet, loop(dcfx.compile(unet, scheduler=scheduler, **config), scheduler, call))
    return _FRESH[key][1]


class Boom(Exception):
    pass


def failing_at(fast, calls):
    """Makes the graphs raise Boom on the calls numbered in ``calls`` (counting every graph call)."""
    count = [0]

    def wrap(fn):
        def run(*args):
            count[0] += 1
            if count[0] in calls:
                raise Boom(f"graph call {count[0]}")
            return fn(*args)

        return run

    wrap_build(
        fast,
        lambda build, names, tensors, **kw: (lambda p: type(p)(full=wrap(p.full), shallow=wrap(p.shallow)))(
            build(names, tensors, **kw)
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 2, 4, 5])  # full step 0, shallow 1, full 3, shallow 4 at 1:3
def test_an_exception_inside_a_step_leaves_no_cache(unet, fail_at):
    call = example_call(unet)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler)
    rec = Recorder(fast)
    failing_at(fast, {fail_at})
    with pytest.raises(Boom):
        loop(fast, scheduler, call)
    # The same generation, continued after the failure: its next step is full, never shallow.
    scheduler.set_timesteps(STEPS)
    kinds_before = len(rec.calls)
    fast(**dict(call, timestep=scheduler.timesteps[fail_at]))
    assert rec.calls[kinds_before:] == ["full"]
    # The next generation equals a fresh runtime's.
    torch.testing.assert_close(loop(fast, scheduler, call), fresh(unet, call, branch=1, interval=3), atol=0, rtol=0)


@pytest.mark.parametrize("how", ["interrupt", "exception"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_pipeline_generation_abandoned_after_k_steps(how, k):
    pipe = make_sd_pipeline()
    dcfx.enable(pipe, branch=0, interval=3)
    want = run_sd(pipe, steps=STEPS, seed=1)

    def stop(p, i, t, kwargs):
        if i == k - 1:
            if how == "exception":
                raise Boom("cancelled")
            p._interrupt = True
        return kwargs

    g = torch.Generator().manual_seed(1234)
    embeds = torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    try:
        pipe(
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            num_inference_steps=STEPS,
            height=32,
            width=32,
            output_type="latent",
            callback_on_step_end=stop,
        )
    except Boom:
        assert how == "exception"
    pipe._interrupt = False
    calls_after_k = pipe.unet.stats["full"] + pipe.unet.stats["shallow"]
    got = run_sd(pipe, steps=STEPS, seed=1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert calls_after_k == STEPS + k  # the abandoned generation made k U-Net calls


@pytest.mark.slow
def test_resolution_and_batch_changes_between_generations():
    unet = tiny_unet()
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=2, interval=3, scheduler=scheduler)
    calls = [example_call(unet, size=16), example_call(unet, size=24), example_call(unet, batch=3, size=16)]
    for call in [*calls, calls[0], calls[2], calls[1]]:
        torch.testing.assert_close(loop(fast, scheduler, call), fresh(unet, call, branch=2, interval=3), atol=0, rtol=0)


@pytest.mark.slow
def test_shape_changes_within_a_generation_are_full_steps_of_their_own(unet):
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=0, interval=4, scheduler=scheduler)
    rec = Recorder(fast)
    small, large = example_call(unet, size=16), example_call(unet, size=24)
    # Steps alternate between two shapes: each change is a full step (its own cache), and a
    # return to a shape whose cache was overwritten is full again.
    order = [small, small, large, large, small, small, small, large]
    scheduler.set_timesteps(STEPS)
    outs = [fast(**dict(c, timestep=t)).sample for c, t in zip(order, scheduler.timesteps, strict=True)]
    assert rec.calls == ["full", "shallow", "full", "shallow", "full", "shallow", "shallow", "full"]
    for i in (0, 2, 4, 7):
        plain = unet(**dict(order[i], timestep=scheduler.timesteps[i])).sample
        torch.testing.assert_close(outs[i], plain, atol=0, rtol=0)


@pytest.mark.parametrize("interval", [2, 3])
def test_reset_at_every_step(unet, interval):
    call = example_call(unet)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=1, interval=interval, scheduler=scheduler)
    rec = Recorder(fast)
    want = loop(fast, scheduler, call)
    for k in range(STEPS):
        rec.calls.clear()
        loop(fast, scheduler, call, on_step=lambda i, k=k: fast.reset() if i == k else None)
        # Steps before k follow the schedule; from k on, a generation of STEPS - k steps starts.
        before = [i for i in full_step_indices(fast.deepcache_config, STEPS) if i < k]
        after = [k + i for i in full_step_indices(fast.deepcache_config, STEPS - k)]
        assert rec.full_steps() == sorted(set(before + after)), k
    torch.testing.assert_close(loop(fast, scheduler, call), want, atol=0, rtol=0)


def test_moving_the_runtime_mid_generation(unet):
    unet = tiny_sd()
    call = example_call(unet)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(STEPS)
    fast = dcfx.compile(unet, branch=0, interval=4, scheduler=scheduler)
    rec = Recorder(fast)
    ts = scheduler.timesteps
    fast(**dict(call, timestep=ts[0]))
    fast(**dict(call, timestep=ts[1]))
    assert fast.to(torch.float32) is fast  # a move to where it is changes nothing
    fast(**dict(call, timestep=ts[2]))
    fast.to(torch.float64)
    double = {k: v.double() for k, v in call.items() if k != "timestep"}
    out = fast(**dict(double, timestep=ts[3])).sample
    fast(**dict(double, timestep=ts[4]))
    fast(**dict(double, timestep=ts[5]))
    # The move makes step 3 full; step 4 is full by the 1:4 schedule, step 5 shallow.
    assert rec.calls == ["full", "shallow", "shallow", "full", "full", "shallow"]
    torch.testing.assert_close(out, unet(**dict(double, timestep=ts[3])).sample, atol=0, rtol=0)


def test_replaced_weights_are_never_computed_with_stale_graphs():
    unet, other = tiny_sd(seed=0), tiny_sd(seed=1)
    call = example_call(unet)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler)
    loop(fast, scheduler, call)
    # New Parameter objects (as load_state_dict(assign=True) or a LoRA loader makes them): the
    # graphs still hold the old ones, so the next generation must build new graphs.
    unet.load_state_dict(other.state_dict(), assign=True)
    got = loop(fast, scheduler, call)
    torch.testing.assert_close(got, fresh(other, call, branch=1, interval=3), atol=0, rtol=0)


@pytest.mark.slow
def test_two_pipelines_sharing_weights_in_two_threads_equal_sequential_runs():
    unet = tiny_sd()
    pipes = [make_sd_pipeline(unet=unet, scheduler=DDIMScheduler()) for _ in range(2)]
    for pipe, (branch, interval) in zip(pipes, [(0, 3), (2, 2)], strict=True):
        dcfx.enable(pipe, branch=branch, interval=interval)
    jobs = [(pipes[0], 16, 0), (pipes[1], 24, 1), (pipes[0], 16, 2), (pipes[1], 24, 3)]
    sequential = [run_sd(pipe, steps=6, size=size * 2, seed=seed) for pipe, size, seed in jobs]
    for pipe in pipes:
        pipe.unet.clear_graphs()  # the threads build their graphs concurrently, too
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(which: int) -> None:
        try:
            start.wait()
            for j, (pipe, size, seed) in enumerate(jobs):
                if j % 2 == which:
                    for _ in range(2):  # two generations in a row per job
                        results[j] = run_sd(pipe, steps=6, size=size * 2, seed=seed)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for j, want in enumerate(sequential):
        torch.testing.assert_close(results[j], want, atol=0, rtol=0)
