"""Schedulers in a real SD pipeline: the step semantics, exact against the reference helper.

One U-Net call per step with unique timesteps (DPM singlestep, Euler, Euler a, LCM, UniPC;
DDIM and DPMSolverMultistep are in tests/test_reference.py): exact against DeepCacheSDHelper.

Heun and DPM2 call the U-Net twice per step; PNDM's Runge-Kutta start calls it four times per
step, with repeated timesteps. dcfx's rule: **every U-Net call is a step**, counted in the
order of ``scheduler.timesteps`` (which lists one entry per call), so 1:N means one full call
in N and the speedup N / (1 + (N - 1) r) holds. The stock helper instead gives every call at
a repeated timestep the index of that timestep's first occurrence; ``CallCountingHelper`` is
the helper with the call rule, and dcfx equals it exactly.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from DeepCache import DeepCacheSDHelper

import dcfx
from tests.fixtures import make_sd_pipeline, run_sd

ONE_CALL_PER_STEP = [
    "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LCMScheduler",
    "UniPCMultistepScheduler",
]
# name, scheduler options, U-Net calls of a 10-step generation
SEVERAL_CALLS_PER_STEP = [
    ("HeunDiscreteScheduler", {}, 19),
    ("KDPM2AncestralDiscreteScheduler", {}, 19),
    ("PNDMScheduler", {}, 19),  # 3 Runge-Kutta steps of 4 calls, then PLMS
    ("PNDMScheduler", {"skip_prk_steps": True}, 11),  # PLMS only: its start repeats one timestep
]


class CallCountingHelper(DeepCacheSDHelper):
    """DeepCacheSDHelper whose step index is the U-Net call count of the generation."""

    def wrap_unet_forward(self) -> None:
        forward = self.pipe.unet.forward
        self.function_dict["unet_forward"] = forward
        calls = iter(range(10**9))

        def wrapped(*args, **kwargs):
            self.cur_timestep = next(calls)
            return forward(*args, **kwargs)

        self.pipe.unet.forward = wrapped


def helper_run(helper_class, make, interval=3, branch=0) -> torch.Tensor:
    pipe = make_sd_pipeline(scheduler=make())
    helper = helper_class(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run_sd(pipe, steps=10)
    finally:
        helper.disable()


def dcfx_run(make, **config) -> tuple[torch.Tensor, dict[str, int]]:
    pipe = make_sd_pipeline(scheduler=make())
    pipe.unet = dcfx.compile(pipe.unet, scheduler=pipe.scheduler, **{"branch": 0, "interval": 3, **config})
    return run_sd(pipe, steps=10), pipe.unet.stats


def no_cache_run(make) -> torch.Tensor:
    return run_sd(make_sd_pipeline(scheduler=make()), steps=10)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ONE_CALL_PER_STEP)
def test_scheduler_matches_the_reference(scheduler):
    make = getattr(diffusers, scheduler)
    want = helper_run(DeepCacheSDHelper, make)
    got, stats = dcfx_run(make)
    assert stats == {"full": 4, "shallow": 6}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (no_cache_run(make) - want).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("scheduler", "options", "calls"), SEVERAL_CALLS_PER_STEP)
def test_every_unet_call_is_a_step(scheduler, options, calls):
    def make():
        return getattr(diffusers, scheduler)(**options)

    want = helper_run(CallCountingHelper, make)
    got, stats = dcfx_run(make)
    full = -(-calls // 3)
    assert stats == {"full": full, "shallow": calls - full}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (no_cache_run(make) - want).abs().max() > 1e-3


def test_the_stock_helper_indexes_repeated_timesteps_by_first_occurrence():
    # Why the call-counting oracle: on Heun the stock helper's step index is that of the
    # timestep's first occurrence (0, 1, 1, 3, 3, ...), so its full calls differ from 1:N.
    make = diffusers.HeunDiscreteScheduler
    stock = helper_run(DeepCacheSDHelper, make)
    got, _ = dcfx_run(make)
    assert (got - stock).abs().max() > 1e-3


@pytest.mark.slow
def test_the_caching_window_keeps_a_sensitive_start_full():
    # The remedy for samplers that degrade: full calls before `start` (PNDM: all 12
    # Runge-Kutta calls), 1:N after. Closer to the no-cache output.
    make, start = diffusers.PNDMScheduler, 12
    exact = no_cache_run(make)
    uniform, _ = dcfx_run(make)
    windowed, stats = dcfx_run(make, schedule="window", start=start)
    assert stats == {"full": start + -(-(19 - start) // 3), "shallow": (19 - start) - -(-(19 - start) // 3)}
    assert (windowed - exact).abs().max() < 0.5 * (uniform - exact).abs().max()


def test_without_a_scheduler_a_repeated_timestep_starts_over_with_a_warning(caplog):
    # Counting by timestep value cannot tell Heun's second call at t from a new generation
    # at t: it starts over (a full step, never a stale cache) and says to pass scheduler=.
    make = diffusers.HeunDiscreteScheduler
    pipe = make_sd_pipeline(scheduler=make())
    pipe.unet = dcfx.compile(pipe.unet, branch=0, interval=3)
    with caplog.at_level("WARNING", logger="dcfx.runtime"):
        got = run_sd(pipe, steps=10)
    assert pipe.unet.stats == {"full": 10, "shallow": 9}
    assert sum("scheduler=" in r.getMessage() for r in caplog.records) == 1
    assert torch.isfinite(got).all()
