"""Schedulers with one U-Net call per step and unique timesteps: exact against DeepCacheSDHelper.

(DDIM and DPMSolverMultistep are in tests/test_reference.py.) PNDM's PLMS start and Heun call
the U-Net more than once per step or repeat timesteps: their semantics are still to be defined.
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


@pytest.mark.parametrize("scheduler", ONE_CALL_PER_STEP)
def test_scheduler_matches_the_reference(scheduler):
    make = getattr(diffusers, scheduler)
    pipe = make_sd_pipeline(scheduler=make())
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    want = run_sd(pipe, steps=10)
    helper.disable()
    pipe = make_sd_pipeline(scheduler=make())
    pipe.unet = dcfx.compile(pipe.unet, branch=0, interval=3, scheduler=pipe.scheduler)
    got = run_sd(pipe, steps=10)
    assert pipe.unet.stats == {"full": 4, "shallow": 6}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (run_sd(make_sd_pipeline(scheduler=make()), steps=10) - want).abs().max() > 1e-3
