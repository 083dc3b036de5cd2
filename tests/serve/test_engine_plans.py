"""The engine steps each generation as the runtime plans it: forecasting, and the runtime's current schedule.

The runtime and the engine share one planner (``dcfx.planner``), so whatever the runtime's
config says (its schedule, its forecast mode, a ``reschedule``) a served generation does too.
Same padded batch size, same kernels: served and offline generations are compared bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dcfx
from dcfx.digits import generate, load_model
from dcfx.serve import DigitsServeModel, Engine, EngineConfig, GenerationRequest
from tests.serve.helpers import drive, random_arrivals


@pytest.fixture(scope="module")
def digits():
    model = load_model()
    return model, DigitsServeModel(model)


def offline(runtime, model, request: GenerationRequest) -> torch.Tensor:
    labels = torch.tensor(request.labels)
    scheduler = model.scheduler()
    return generate(
        runtime, model.tokens, scheduler, labels, steps=request.steps, guidance=request.guidance, seed=request.seed
    )


@pytest.mark.parametrize("guidance", [1.0, pytest.param(2.5, marks=pytest.mark.slow)])
def test_a_served_forecast_equals_offline_generation(digits, guidance):
    model, serve_model = digits
    runtime = dcfx.compile(model.unet, branch=0, interval=3, forecast="linear")
    request = GenerationRequest(labels=(3, 7), seed=11, steps=20, guidance=guidance)
    engine = Engine(runtime, serve_model)
    served = engine.run([request])[0]
    want = offline(runtime, model, request)
    torch.testing.assert_close(served.latents, want, atol=0, rtol=0)
    assert (served.full_steps, served.shallow_steps) == (7, 13)
    # Full steps 0, 3, ..., 18; every shallow step after the second full step reads a forecast: 11 of 13.
    assert engine.stats()["forecast_calls"] == 11
    reuse = offline(runtime.reschedule(forecast="none"), model, request)
    assert (served.latents - reuse).abs().max() > 1e-2  # forecasting changed the image


def test_batched_forecast_requests_equal_their_solo_runs_exactly(digits):
    model, serve_model = digits
    runtime = dcfx.compile(model.unet, branch=0, interval=3, forecast="linear")
    config = EngineConfig(max_batch=4, batch_sizes=(4,))
    requests = [
        GenerationRequest(labels=(i,), seed=200 + i, steps=(7, 10, 13)[i % 3], guidance=2.0 if i % 4 == 1 else 1.0)
        for i in range(9)
    ]
    engine = Engine(runtime, serve_model, config)
    results = drive(engine, random_arrivals(requests, seed=3, spread=10))
    for request, got in zip(requests, results, strict=True):
        want = Engine(runtime, serve_model, config).run([request])[0]
        torch.testing.assert_close(got.latents, want.latents, atol=0, rtol=0)
        assert (got.full_steps, got.shallow_steps) == (want.full_steps, want.shallow_steps)
    stats = engine.stats()
    assert max(stats["shallow_rows"]) >= 2 and stats["forecast_calls"] > 0  # forecast steps did share calls
    # One request alone at batch 1 is the offline generation exactly.
    alone = Engine(runtime, serve_model, EngineConfig(max_batch=2, batch_sizes=(1, 2))).run([requests[0]])[0]
    torch.testing.assert_close(alone.latents, offline(runtime, model, requests[0]), atol=0, rtol=0)


@pytest.mark.slow
def test_reschedule_applies_to_generations_the_engine_starts_afterwards(digits):
    model, serve_model = digits
    runtime = dcfx.compile(model.unet, branch=0, interval=3)
    engine = Engine(runtime, serve_model, EngineConfig(max_batch=1, batch_sizes=(1,)))
    first = GenerationRequest(labels=(1,), seed=1, steps=12)
    early = engine.submit(first)
    for _ in range(4):
        engine.tick()
    runtime.reschedule(interval=5)  # the same graphs serve every schedule of the branch
    second = dataclasses.replace(first, labels=(2,), seed=2)
    late = engine.submit(second)
    engine.run_until_idle()
    # The generation in flight keeps the plan it started with; the next one takes the new schedule.
    assert (early.result().full_steps, late.result().full_steps) == (4, 3)  # 1:3 and 1:5 of 12 steps
    torch.testing.assert_close(late.result().latents, offline(runtime, model, second), atol=0, rtol=0)
    # Forecasting switched on by reschedule: the next generations forecast, as offline ones do.
    runtime.reschedule(forecast="linear")
    third = dataclasses.replace(first, labels=(3,), seed=3)
    served = engine.run([third])[0]
    assert engine.stats()["forecast_calls"] == 5  # steps 6-9 and 11 of 12 (full: 0, 5, 10)
    torch.testing.assert_close(served.latents, offline(runtime, model, third), atol=0, rtol=0)
