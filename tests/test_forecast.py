"""Forecast caching: shallow steps read f1 + c (f1 - f0), exact against a plain eager reference.

The reference (tests/forecast_reference.py) runs the whole U-Net and swaps the cached
branch's input with hooks: no graph is cut. dcfx's graphs must give the same latents over
whole sampling runs, and ``forecast="none"`` must stay the paper's reuse.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

import dcfx
from dcfx.schedule import plan
from tests.fixtures import example_call, tiny_sd
from tests.forecast_reference import DeepCacheReference

STEPS = 10


@pytest.fixture(scope="module")
def unet():
    return tiny_sd()


def reference(unet, branch: int, interval: int, forecast: bool, scheduler, call, x, steps=STEPS) -> torch.Tensor:
    info = dcfx.branches(unet, sample_shape=tuple(call["sample"].shape))[branch]
    block, layer = (int(p) for p in info.up_layer.split(".")[1::2])
    resnet = unet.up_blocks[block].resnets[layer]
    ref = DeepCacheReference(unet, resnet, hidden_channels=info.cache_shape[1], forecast=forecast)
    try:
        full_steps = plan(dcfx.DeepCacheConfig(branch=branch, interval=interval), steps)
        return ref.generate(scheduler, call, x, full_steps.is_full, steps)
    finally:
        ref.handle.remove()


def loop(runtime, scheduler, call, x, steps=STEPS) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(runtime(**dict(call, sample=x, timestep=t)).sample, t, x).prev_sample
    return x


def noise(call, seed=0):
    return torch.randn(call["sample"].shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 3), (2, 5)])
def test_forecast_equals_the_eager_reference(unet, branch, interval):
    call = example_call(unet, batch=2, size=16)
    x = noise(call)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=branch, interval=interval, forecast="linear", scheduler=scheduler)
    got = loop(fast, scheduler, call, x)
    want = reference(unet, branch, interval, True, DDIMScheduler(), call, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    reuse = reference(unet, branch, interval, False, DDIMScheduler(), call, x)
    assert (got - reuse).abs().max() > 1e-4, "forecasting changed nothing: the test would be vacuous"
    # The reuse reference is the paper's DeepCache: forecast="none" equals it.
    plain = dcfx.compile(unet, branch=branch, interval=interval, scheduler=scheduler)
    torch.testing.assert_close(loop(plain, scheduler, call, x), reuse, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_new_generation_starts_with_no_history(unet):
    call = example_call(unet, batch=1, size=16)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=0, interval=3, forecast="linear", scheduler=scheduler)
    first = loop(fast, scheduler, call, noise(call, 0))
    second = loop(fast, scheduler, call, noise(call, 1))
    fresh = dcfx.compile(unet, branch=0, interval=3, forecast="linear", scheduler=scheduler)
    torch.testing.assert_close(second, loop(fresh, scheduler, call, noise(call, 1)), atol=0, rtol=0)
    assert not torch.equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize("make", [HeunDiscreteScheduler, EulerDiscreteScheduler])
def test_repeated_and_uneven_timesteps(unet, make):
    # Heun calls the U-Net twice per step at repeated timesteps; Euler's timesteps are floats.
    call = example_call(unet, batch=1, size=16)
    x = noise(call) * 10
    scheduler = make(timestep_spacing="leading")
    fast = dcfx.compile(unet, branch=0, interval=2, forecast="linear", scheduler=scheduler)
    got = loop(fast, scheduler, call, x, steps=6)
    assert torch.isfinite(got).all()
    calls = len(scheduler.timesteps)
    want = reference(unet, 0, 2, True, make(timestep_spacing="leading"), call, x, steps=6)
    assert fast.stats["full"] == (calls + 1) // 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_two_feature_buffers_at_fixed_addresses(unet):
    call = example_call(unet, batch=1, size=16)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=0, interval=2, forecast="linear", scheduler=scheduler)
    loop(fast, scheduler, call, noise(call))
    state = fast._state()
    addresses = {b.data_ptr() for b in state.buffers}
    assert len(addresses) == 2 and {state.cache.data_ptr(), state.previous.data_ptr()} == addresses
    loop(fast, scheduler, call, noise(call, 1))
    assert {b.data_ptr() for b in state.buffers} == addresses


@pytest.mark.slow
def test_reschedule_turns_forecasting_on_and_off(unet):
    call = example_call(unet, batch=1, size=16)
    x = noise(call)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=0, interval=3, scheduler=scheduler)
    reuse = loop(fast, scheduler, call, x)
    forecast = loop(fast.reschedule(forecast="linear"), scheduler, call, x)
    assert fast.graph_builds == 2  # the forecast graph comes with a new build
    torch.testing.assert_close(loop(fast.reschedule(forecast="none"), scheduler, call, x), reuse, atol=0, rtol=0)
    assert not torch.equal(forecast, reuse)
