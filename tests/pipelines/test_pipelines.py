"""Real diffusers pipelines with ``pipe.unet = dcfx.compile(...)``, exact against DeepCacheSDHelper.

SDXL and SDXL img2img (added_cond_kwargs), ControlNet and SDXL ControlNet (the residuals are
graph inputs; shallow steps use the fresh residuals of the skips they consume, as the helper's
do), img2img (the schedule starts at the first executed step), inpaint (a 9-channel U-Net),
SD 2.x (v-prediction, linear projections), LCM (timestep_cond), DDPM and a class-conditional
UNet2DModel, and SVD (UNetSpatioTemporalConditionModel, 5-d samples). Eager backend, fp32.
The Inductor backend runs every pipeline too (``test_pipeline_under_inductor``; all of them
with ``pytest --inductor-matrix``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch.utils._pytree import tree_map

import dcfx
from tests.pipelines.builders import CASES, run_with_helper


def with_dcfx(make, run, **config) -> tuple[torch.Tensor, dict[str, int]]:
    pipe = make()
    pipe.unet = dcfx.compile(pipe.unet, scheduler=pipe.scheduler, **config)
    return run(pipe), pipe.unet.stats


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def expected_stats(calls: int, interval: int) -> dict[str, int]:
    full = math.ceil(calls / interval)
    return {"full": full, "shallow": calls - full}


# Branch 0 with 1:3 everywhere; a deeper branch with 1:4 where the inputs change what a
# shallow step consumes (ControlNet residuals of more skips, SDXL's blocks, video frames).
SETTINGS = [(case, 0, 3) for case in sorted(CASES)] + [
    (case, 2, 4) for case in ("controlnet", "sdxl-controlnet", "svd")
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "branch", "interval"), SETTINGS)
def test_pipeline_matches_the_reference_run_first(case, branch, interval):
    """What a user comparing dcfx with DeepCache does: one pipeline, the helper first, then dcfx."""
    make, run, calls = CASES[case]
    pipe = make()
    plain = run(pipe)
    want = run_with_helper(pipe, run, branch, interval)
    # The helper's disable() leaves the original bound forwards on the module instances.
    assert any("forward" in m.__dict__ for m in pipe.unet.modules())
    pipe.unet = dcfx.compile(pipe.unet, scheduler=pipe.scheduler, branch=branch, interval=interval)
    got = run(pipe)
    assert pipe.unet.stats == expected_stats(calls, interval)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Not vacuous: caching changed the output.
    assert (plain - want).abs().max() > 1e-3
    # Every step full: the plain pipeline, bit for bit (the graphs are the model's own ops).
    pipe.unet.reschedule(interval=1)
    torch.testing.assert_close(run(pipe), plain, atol=0, rtol=0)


# Inductor takes 3-4 minutes per tiny pipeline on 2 CPU cores (the Python side of its C++
# codegen, for graphs of ~2000 nodes): CI runs ControlNet (residuals as graph inputs); the
# others run with --inductor-matrix.
INDUCTOR_IN_CI = "controlnet"


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [c if c == INDUCTOR_IN_CI else pytest.param(c, marks=pytest.mark.inductor_matrix) for c in sorted(CASES)],
)
def test_pipeline_under_inductor(case):
    make, run, calls = CASES[case]
    want, _ = with_dcfx(make, run, branch=0, interval=3)
    pipe = make()
    pipe.unet = dcfx.compile(pipe.unet, branch=0, interval=3, scheduler=pipe.scheduler, backend="inductor")
    recorded = []
    hook = pipe.unet.register_forward_hook(
        lambda _, args, kwargs, out: recorded.append((tree_map(_clone, (args, kwargs)), _sample(out))),
        with_kwargs=True,
    )
    # Two generations, one compile: the steps of a shape never recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = run(pipe)
        assert pipe.unet.stats == expected_stats(calls, 3)
        hook.remove()
        second = run(pipe)
    # Per call, on the very same inputs, the compiled graphs equal the eager ones closely.
    eager_runtime = dcfx.compile(make().unet, branch=0, interval=3, scheduler=pipe.scheduler)
    for (args, kwargs), out in recorded:
        torch.testing.assert_close(out, _sample(eager_runtime(*args, **kwargs)), atol=1e-4, rtol=1e-4)
    assert eager_runtime.stats == expected_stats(calls, 3)  # the same full/shallow steps
    # Inductor's kernels round differently (~1e-6 per call); guidance 7.5 amplifies that over
    # ten steps to ~5e-4 of the output's scale (seen on SDXL); caching itself moves the
    # outputs by 5e-2 of that scale or more in these cases.
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(first, want, atol=1e-3 * scale, rtol=0)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    # Freezing copied the weights into the compiled code: a weight written in place afterwards
    # moves its version counter, and the next generation runs on graphs built again (the
    # other changes users make: tests/pipelines/test_model_changes.py).
    with torch.no_grad():
        pipe.unet.model.conv_out.bias.add_(1.0)
    changed = run(pipe)
    assert pipe.unet.graph_builds == 2
    eager = make()
    eager.unet = dcfx.compile(pipe.unet.model, branch=0, interval=3, scheduler=eager.scheduler)
    want_changed = run(eager)
    assert (want_changed - want).abs().max() > 1e-3
    torch.testing.assert_close(changed, want_changed, atol=1e-3 * scale, rtol=0)
