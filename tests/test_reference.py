"""dcfx's outputs equal the reference implementation's (DeepCache 0.1.1, DeepCacheSDHelper).

fp32, eager backend. The helper numbers branches block = id // 3, layer = id % 3, which agrees
with dcfx only where every up block has 3 layers: the tiny models here have layers_per_block=2.
The helper never resets between generations, so each reference run gets a fresh pipeline.
Every case also checks that caching changed the output, so the equality is not vacuous.
"""

from __future__ import annotations

import math

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import dcfx
from tests.fixtures import make_ddim_pipeline, make_sd_pipeline, run_ddim, run_sd

STEPS = 10
SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def sd_pipe(scheduler: str):
    return make_sd_pipeline(scheduler=SCHEDULERS[scheduler]())


def reference(pipe, run, branch: int, interval: int, **kwargs) -> torch.Tensor:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run(pipe, steps=STEPS, **kwargs)
    finally:
        helper.disable()


def assert_full_and_shallow(pipe, interval: int, generations: int = 1) -> None:
    full = math.ceil(STEPS / interval) * generations
    assert pipe.unet.stats == {"full": full, "shallow": STEPS * generations - full}


def assert_cached(actual: torch.Tensor, plain: torch.Tensor) -> None:
    assert (actual - plain).abs().max() > 1e-6, "caching did not change the output"


@pytest.fixture(scope="module")
def plain_sd() -> dict[str, torch.Tensor]:
    return {name: run_sd(sd_pipe(name), steps=STEPS) for name in SCHEDULERS}


# Each scheduler with every interval and a branch in every up block, as a Latin square (0 lies
# in the last up block, 4 in the middle one, 8 in the first, the deepest), and branch 1, inside
# a block. A graph build takes seconds, so the suite covers the pairs; the whole product
# (2 schedulers x branches 0, 1, 4, 8 x intervals 2, 3, 5) was run once outside it, all exact.
SD_CASES = [
    ("ddim", 0, 2),
    ("ddim", 4, 5),
    ("ddim", 8, 3),
    ("dpm", 0, 5),
    ("dpm", 4, 3),
    ("dpm", 8, 2),
    ("dpm", 1, 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("scheduler", "branch", "interval"), SD_CASES)
def test_sd_matches_reference(plain_sd, scheduler, branch, interval):
    expected = reference(sd_pipe(scheduler), run_sd, branch, interval)
    pipe = dcfx.enable(sd_pipe(scheduler), branch=branch, interval=interval)
    actual = run_sd(pipe, steps=STEPS)
    assert_full_and_shallow(pipe, interval)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert_cached(actual, plain_sd[scheduler])


def test_two_generations_each_match_a_fresh_reference():
    # Interval 3 does not divide 10: a step count carried over would make step 0 shallow.
    scheduler, branch, interval = "dpm", 0, 3
    pipe = dcfx.enable(sd_pipe(scheduler), branch=branch, interval=interval)
    for seed in (0, 1):
        expected = reference(sd_pipe(scheduler), run_sd, branch, interval, seed=seed)
        torch.testing.assert_close(run_sd(pipe, steps=STEPS, seed=seed), expected, atol=1e-5, rtol=0)
    assert_full_and_shallow(pipe, interval, generations=2)


@pytest.fixture(scope="module")
def plain_ddim() -> torch.Tensor:
    return run_ddim(make_ddim_pipeline(), steps=STEPS)


@pytest.mark.parametrize(("branch", "interval"), [(0, 2), (3, 3), (7, 2)])
def test_ddim_unet2d_matches_reference(plain_ddim, branch, interval):
    expected = reference(make_ddim_pipeline(), run_ddim, branch, interval)
    pipe = dcfx.enable(make_ddim_pipeline(), branch=branch, interval=interval)
    actual = run_ddim(pipe, steps=STEPS)
    assert_full_and_shallow(pipe, interval)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert_cached(actual, plain_ddim)
