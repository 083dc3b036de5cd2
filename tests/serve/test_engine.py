"""The step-batching engine: batching changes nothing but speed; admission, queue and cache rows.

Exactness. A U-Net's rows never mix, but on a CPU the kernels a call runs depend on its batch
size: PyTorch runs a 3x3 convolution of one image as im2col + MKL SGEMM and of two or more
through oneDNN's direct convolution; a 1x1 convolution of up to 8 images as one SGEMM per
image and of 16 through oneDNN's jit_1x1; MKL's SGEMM takes other kernels for 1, 2-3 and 4+
rows (ONEDNN_VERBOSE=1 and MKL_VERBOSE=1 show each). Each rounds ~1e-7 differently, which 50
DDIM steps grow to ~5e-6 at most on images in [-1, 1] (16 digits, random arrivals: 4.4e-6).
So requests batched at one padded batch size equal their solo runs bit for bit, and with
several batch sizes they agree to 1e-5.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx.digits import generate, load_model
from dcfx.serve import (
    DigitsServeModel,
    Engine,
    EngineConfig,
    EngineStopped,
    GenerationRequest,
    QueueFull,
    UNetServeModel,
)
from tests.fixtures import tiny_sd
from tests.serve.helpers import drive, random_arrivals

INTERVAL = 3


@pytest.fixture(scope="module")
def digits():
    model = load_model()
    return DigitsServeModel(model), dcfx.compile(model.unet, branch=0, interval=INTERVAL)


def solo(runtime, model, config, request):
    return Engine(runtime, model, config).run([request])[0]


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_a_request_alone_equals_offline_generation(digits, guidance):
    model, runtime = digits
    request = GenerationRequest(labels=(3, 7), seed=11, steps=8, guidance=guidance)
    result = Engine(runtime, model).run([request])[0]
    scheduler = model.model.scheduler()
    want = generate(runtime, model.model.tokens, scheduler, torch.tensor([3, 7]), steps=8, guidance=guidance, seed=11)
    torch.testing.assert_close(result.latents, want, atol=0, rtol=0)
    assert (result.full_steps, result.shallow_steps) == (3, 5)  # steps 0, 3, 6 full under 1:3


def mixed_requests() -> list[GenerationRequest]:
    """Digits of two sizes and two schedulers, mixed step counts, some guided."""
    out = []
    for i in range(10):
        out.append(
            GenerationRequest(
                labels=(i % 10,),
                seed=100 + i,
                steps=(5, 8, 11)[i % 3],
                guidance=2.0 if i % 4 == 1 else 1.0,
                size=(16, 16) if i % 2 == 0 else (8, 8),
                scheduler="dpm" if i % 5 == 3 else "ddim",
            )
        )
    return out


def test_batched_requests_equal_their_solo_runs_exactly(digits):
    model, runtime = digits
    config = EngineConfig(max_batch=4, batch_sizes=(4,))
    engine = Engine(runtime, model, config)
    requests = mixed_requests()
    results = drive(engine, random_arrivals(requests, seed=0, spread=12))
    for request, got in zip(requests, results, strict=True):
        want = solo(runtime, model, config, request)
        torch.testing.assert_close(got.latents, want.latents, atol=0, rtol=0)
        assert (got.full_steps, got.shallow_steps) == (want.full_steps, want.shallow_steps)
    stats = engine.stats()
    assert max(stats["full_rows"]) >= 2 and max(stats["shallow_rows"]) >= 2  # steps did share calls
    assert max(stats["full_rows"]) <= 4 and max(stats["shallow_rows"]) <= 4  # max_batch rows at most
    assert stats["completed"] == len(requests) and stats["cache_copies"] == 0  # every cohort stayed in phase


def test_mixed_batch_sizes_agree_to_kernel_rounding(digits):
    model, runtime = digits
    config = EngineConfig(max_batch=4)  # calls padded to 1, 2 or 4 rows
    requests = [dataclasses.replace(r, size=(16, 16), scheduler="ddim") for r in mixed_requests()]
    results = drive(Engine(runtime, model, config), random_arrivals(requests, seed=1, spread=12))
    for request, got in zip(requests, results, strict=True):
        want = solo(runtime, model, config, request)
        torch.testing.assert_close(got.latents, want.latents, atol=1e-5, rtol=0)


def test_a_full_queue_refuses_at_once_and_frees_up(digits):
    model, runtime = digits
    engine = Engine(runtime, model, EngineConfig(max_batch=1, batch_sizes=(1,), max_queue=2))
    futures = [engine.submit(GenerationRequest(labels=(1,), steps=2)) for _ in range(2)]
    start = time.perf_counter()
    with pytest.raises(QueueFull, match=r"queue is full \(2 requests waiting, max_queue=2\)"):
        engine.submit(GenerationRequest(labels=(1,), steps=2))
    assert time.perf_counter() - start < 0.5
    engine.tick()  # the first request starts: one place frees up
    futures.append(engine.submit(GenerationRequest(labels=(1,), steps=2)))
    engine.run_until_idle()
    assert all(f.result().latents.shape == (1, 1, 16, 16) for f in futures)
    assert engine.stats()["rejected"] == 1


def two_requests(second_at: int, config: EngineConfig, digits) -> tuple:
    model, runtime = digits
    first = GenerationRequest(labels=(2,), seed=1, steps=12)
    second = GenerationRequest(labels=(5,), seed=2, steps=7)
    engine = Engine(runtime, model, config)
    a, b = drive(engine, [(0, first), (second_at, second)])
    for request, got in ((first, a), (second, b)):
        torch.testing.assert_close(got.latents, solo(runtime, model, config, request).latents, atol=0, rtol=0)
    return a, b, engine.stats()


def test_a_new_request_waits_for_the_cohorts_next_full_step(digits):
    # The first request's full steps fall on ticks 0, 3, 6, 9; the second arrives on tick 1.
    _, b, stats = two_requests(1, EngineConfig(max_batch=2, batch_sizes=(2,)), digits)
    assert (b.start_tick, b.waited_ticks) == (3, 2)
    # One call per tick: full on ticks 0, 3, 6, 9 (both in one call from tick 3), shallow otherwise.
    assert stats["full_calls"] == 4 and stats["full_calls"] + stats["shallow_calls"] == stats["ticks"] == 12
    assert stats["cache_copies"] == 0 and stats["admitted_aligned"] == 1


def test_without_alignment_a_request_starts_at_once_in_a_call_of_its_own(digits):
    _, b, stats = two_requests(1, EngineConfig(max_batch=2, batch_sizes=(2,), max_wait=0), digits)
    assert (b.start_tick, b.waited_ticks) == (1, 0)
    # Out of phase: the second's full steps (ticks 1, 4, 7) are extra full calls, and on the
    # ticks where both are shallow their cache rows come from two full calls (gathered).
    # Shallow: the first's 8 ticks and the second's 4, two of them (ticks 2 and 5) shared.
    assert (stats["ticks"], stats["full_calls"], stats["shallow_calls"]) == (12, 4 + 3, 8 + 4 - 2)
    assert stats["cache_copies"] == 2 and stats["admitted_at_once"] == 2


@pytest.mark.parametrize(("second_at", "start"), [(1, 1), (2, 3)])
def test_max_wait_bounds_the_wait_for_alignment(digits, second_at, start):
    # Arriving on tick 1 the wait would be 2 ticks (> max_wait 1): it starts at once; on tick 2, 1 tick.
    _, b, _ = two_requests(second_at, EngineConfig(max_batch=2, batch_sizes=(2,), max_wait=1), digits)
    assert b.start_tick == start


def test_request_level_batching_runs_a_batch_to_completion_first(digits):
    _, b, stats = two_requests(1, EngineConfig(max_batch=2, batch_sizes=(2,), batching="request"), digits)
    assert b.start_tick == 12  # after the first request's 12 steps
    assert stats["ticks"] == 12 + 7


def test_a_cohort_never_runs_more_than_max_batch_rows(digits):
    model, runtime = digits
    engine = Engine(runtime, model, EngineConfig(max_batch=2, batch_sizes=(2,)))
    requests = [GenerationRequest(labels=(d,), seed=d, steps=6) for d in range(3)]
    a, b, c = drive(engine, [(0, r) for r in requests])
    assert a.start_tick == b.start_tick == 0
    assert c.start_tick == 6  # the first free place, on a full step of the (then empty) cohort
    assert set(engine.stats()["full_rows"]) | set(engine.stats()["shallow_rows"]) <= {1, 2}


def test_shallow_steps_read_the_full_calls_buffer_in_place(digits):
    model, runtime = digits
    engine = Engine(runtime, model, EngineConfig(max_batch=4, batch_sizes=(4,)))
    written, read = [], []
    wrapped = {}
    graphs_for = runtime.graphs_for

    def recording_graphs_for(**inputs):
        pair, flat = graphs_for(**inputs)
        if id(pair) not in wrapped:

            def run_full(flat_inputs, buffer_for, pair=pair):
                sample, cache = pair.run_full(flat_inputs, buffer_for)
                written.append(cache.data_ptr())
                return sample, cache

            def run_shallow(flat_inputs, cache, pair=pair):
                read.append(cache.data_ptr())
                return pair.run_shallow(flat_inputs, cache)

            wrapped[id(pair)] = SimpleNamespace(run_full=run_full, run_shallow=run_shallow)
        return wrapped[id(pair)], flat

    engine.runtime = SimpleNamespace(
        graphs_for=recording_graphs_for, planner=runtime.planner, deepcache_config=runtime.deepcache_config
    )
    requests = [GenerationRequest(labels=(d,), seed=d, steps=9 - d) for d in range(3)]
    drive(engine, [(0, requests[0]), (2, requests[1]), (4, requests[2])])
    # One buffer, written by every full call and read in place by every shallow call.
    assert len(set(written)) == 1 and set(read) == set(written) and len(read) > len(written)
    assert engine.stats()["cache_copies"] == 0 and engine.stats()["cache_buffers"] == 1


def test_graphs_rebuilt_mid_generation_make_the_next_step_full():
    unet = tiny_sd()
    model = UNetServeModel(unet, DDIMScheduler().config, name="tiny")
    runtime = dcfx.compile(unet, branch=0, interval=INTERVAL)
    request = GenerationRequest(conditioning={"encoder_hidden_states": torch.randn(1, 4, 8)}, steps=6)
    alone = Engine(runtime, model).run([request])[0]
    engine = Engine(runtime, model)
    future = engine.submit(request)
    engine.tick()
    engine.tick()
    runtime.clear_graphs()  # as a model change does: the cache rows of the old graphs are stale
    engine.run_until_idle()
    got = future.result()
    assert (alone.full_steps, got.full_steps) == (2, 3)  # step 2 ran full, not shallow
    assert got.full_steps + got.shallow_steps == 6


def test_conditioning_tensors_and_guidance_on_any_unet():
    unet = tiny_sd()
    model = UNetServeModel(unet, DDIMScheduler().config, name="tiny")
    runtime = dcfx.compile(unet, branch=0, interval=INTERVAL)
    config = EngineConfig(max_batch=4, batch_sizes=(4,))
    gen = torch.Generator().manual_seed(0)
    requests = [
        GenerationRequest(
            conditioning={"encoder_hidden_states": torch.randn(1 + i % 2, 4, 8, generator=gen)},
            negative_conditioning={"encoder_hidden_states": torch.zeros(1 + i % 2, 4, 8)} if i % 2 else None,
            guidance=3.0 if i % 2 else 1.0,
            seed=i,
            steps=4 + i,
        )
        for i in range(4)
    ]
    results = drive(Engine(runtime, model, config), random_arrivals(requests, seed=2, spread=4))
    for request, got in zip(requests, results, strict=True):
        assert got.latents.shape == (request.conditioning["encoder_hidden_states"].shape[0], 4, 16, 16)
        torch.testing.assert_close(got.latents, solo(runtime, model, config, request).latents, atol=0, rtol=0)


def test_the_engine_serves_from_a_thread_of_its_own(digits):
    model, runtime = digits
    engine = Engine(runtime, model, EngineConfig(max_batch=4, batch_sizes=(4,)))
    engine.start()
    futures = []

    def client(i: int) -> None:
        futures.append(engine.submit(GenerationRequest(labels=(i,), seed=i, steps=4)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(timeout=300) for f in futures]
    assert engine.alive and len(results) == 4
    engine.close()
    assert not engine.alive
    with pytest.raises(EngineStopped, match="takes no new requests"):
        engine.submit(GenerationRequest(labels=(1,), steps=2))


def test_close_without_drain_fails_what_is_left(digits):
    model, runtime = digits
    engine = Engine(runtime, model, EngineConfig(max_batch=1, batch_sizes=(1,)))
    futures = [engine.submit(GenerationRequest(labels=(1,), steps=3)) for _ in range(2)]
    engine.tick()
    engine.close(drain=False)
    for f in futures:
        with pytest.raises(EngineStopped, match="stopped before this request finished"):
            f.result(timeout=0)


@pytest.mark.parametrize(
    ("request_fields", "config", "error", "match"),
    [
        ({"labels": (12,)}, {}, ValueError, r"labels must be digits 0\.\.9, got \[12\]"),
        ({"labels": (1,), "scheduler": "heun"}, {}, ValueError, "unknown scheduler 'heun'; valid: ddim, dpm, euler"),
        ({"labels": (1, 2, 3)}, {"max_batch": 2}, ValueError, "needs 3 U-Net rows per step, more than max_batch 2"),
        ({"labels": (1,), "size": (1000, 16)}, {}, ValueError, "at most 64 per side"),
        (
            {"conditioning": {"encoder_hidden_states": torch.zeros(1, 4, 64)}},
            {},
            ValueError,
            "takes labels",
        ),
    ],
)
def test_bad_requests_are_refused_at_submit(digits, request_fields, config, error, match):
    model, runtime = digits
    engine = Engine(runtime, model, EngineConfig(**config))
    with pytest.raises(error, match=match):
        engine.submit(GenerationRequest(**request_fields))
    assert engine.stats()["queue"] == 0


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps must be an int >= 1, got 0"),
        ({"guidance": 0.5}, ValueError, "guidance must be a finite number >= 1"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"size": (16, 16, 3)}, ValueError, r"size must be an int or \(height, width\)"),
        ({"labels": ()}, TypeError, "labels must be a non-empty sequence of ints"),
    ],
)
def test_bad_request_fields(fields, error, match):
    with pytest.raises(error, match=match):
        GenerationRequest(**{"labels": (1,), **fields})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_batch": 8, "batch_sizes": (1, 4)}, r"max_batch 8 is larger than the largest of batch_sizes \[1, 4\]"),
        ({"batching": "continuous"}, "batching must be one of step, request, got 'continuous'"),
        ({"max_wait": -1}, "max_wait must be an int >= 0"),
        ({"batch_sizes": (0, 2)}, "batch_sizes must be ints >= 1"),
    ],
)
def test_bad_engine_config(fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**fields)


def test_engine_config_defaults():
    assert EngineConfig().batch_sizes == (1, 2, 4, 8, 16)
    assert EngineConfig(max_batch=12).batch_sizes == (1, 2, 4, 8, 12)
    assert EngineConfig(batch_sizes=(8, 2)).max_batch == 8
    assert [EngineConfig(max_batch=12).padded(n) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
