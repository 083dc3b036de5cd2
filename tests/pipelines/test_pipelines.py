"""Real diffusers pipelines with ``pipe.unet = dcfx.compile(...)``, exact against DeepCacheSDHelper.

SDXL (added_cond_kwargs), ControlNet (its residuals are graph inputs; shallow steps use the
fresh residuals of the skips they consume, as the helper's do), img2img (the schedule starts at
the first executed step) and inpaint (a 9-channel U-Net). Eager backend, fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from DeepCache import DeepCacheSDHelper

import dcfx
from tests.pipelines.builders import CASES


def reference(make, run, branch: int, interval: int) -> torch.Tensor:
    pipe = make()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run(pipe)
    finally:
        helper.disable()


@pytest.mark.parametrize(("branch", "interval"), [(0, 3), (2, 4)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_matches_the_reference(case, branch, interval):
    make, run, calls = CASES[case]
    want = reference(make, run, branch, interval)
    pipe = make()
    pipe.unet = dcfx.compile(pipe.unet, branch=branch, interval=interval, scheduler=pipe.scheduler)
    got = run(pipe)
    full = math.ceil(calls / interval)
    assert pipe.unet.stats == {"full": full, "shallow": calls - full}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Not vacuous: caching changed the output.
    assert (run(make()) - want).abs().max() > 1e-3
