"""Property-based tests (hypothesis): the cut, the schedules and the runtime, over random input.

- Random valid tiny U-Nets (both classes; block counts, layers per block, attention or not,
  channel widths, sizes) and random branches: the full graph equals the model, and
  shallow(x, cache of full(x)) == full(x), exactly.
- Random schedules and step counts: step 0 is full, the full-step count, the window, and the
  runtime following the plan call by call.
- Random branches, intervals, step counts and seeds: equality with DeepCacheSDHelper where its
  branch numbering applies (three layers per up block).

CI runs derandomized (the same examples every run; ``.ci/run`` sets ``CI``), so a landing
never depends on luck; run locally, each run draws new examples (``CI=1`` derandomizes them
too). Graph builds take seconds, so the U-Net properties run few examples; the schedule
properties run hundreds. DCFX_HYPOTHESIS_SCALE=10 runs ten times as many examples of each.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcfx
from dcfx.backends import CompiledPair
from dcfx.models import spec_for
from dcfx.passes import build_graph_pair
from dcfx.runtime import DeepCacheUNet
from dcfx.schedule import full_step_indices, non_uniform_full_steps
from tests.fixtures import example_call, make_sd_pipeline, run_sd, tiny_sd

CI = bool(os.environ.get("CI"))
SCALE = int(os.environ.get("DCFX_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> settings:
    """Hypothesis settings for ``n`` examples (times DCFX_HYPOTHESIS_SCALE), derandomized in CI."""
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        derandomize=CI,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


SLOW = examples(10)
FAST = examples(300)


@st.composite
def tiny_unets(draw) -> torch.nn.Module:
    """A random valid tiny U-Net of either class."""
    blocks = draw(st.integers(2, 3))
    widths = tuple(draw(st.lists(st.sampled_from([4, 8, 12]), min_size=blocks, max_size=blocks)))
    attention = draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    layers = draw(st.integers(1, 2))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conditioned = draw(st.booleans())
    attn = "CrossAttn" if conditioned else "Attn"
    common = {
        "sample_size": 8,
        "block_out_channels": widths,
        "down_block_types": tuple(f"{attn}DownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple(f"{attn}UpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "layers_per_block": layers,
        "norm_num_groups": 4,
        "attention_head_dim": 2,
    }
    if conditioned:
        model = UNet2DConditionModel(cross_attention_dim=8, **common)
    else:
        model = UNet2DModel(in_channels=3, out_channels=3, **common)
    return model.eval()


@pytest.mark.slow
@SLOW
@given(unet=tiny_unets(), data=st.data())
def test_shallow_of_the_full_steps_cache_equals_the_full_step(unet, data):
    spec = spec_for(unet)
    branch = data.draw(st.integers(0, len(spec.up_layers(unet)) - 1), label="branch")
    size = data.draw(st.sampled_from([8, 12, 16]), label="size")
    call = example_call(unet, batch=data.draw(st.integers(1, 2), label="batch"), size=size)
    (names, tensors), _ = spec.flatten(unet, (), call)
    pair = build_graph_pair(unet, branch, names, tensors)
    with torch.no_grad():
        out, feature = pair.full(*tensors)
        torch.testing.assert_close(out, unet(**call).sample, atol=0, rtol=0)
        torch.testing.assert_close(pair.shallow(*tensors, feature), out, atol=0, rtol=0)
        # The shallow graph really reads the feature: another feature gives another output.
        assert not torch.equal(pair.shallow(*tensors, feature + 1), out)


@st.composite
def configs(draw) -> dcfx.DeepCacheConfig:
    interval = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["uniform", "non-uniform", "explicit", "window"]))
    if kind == "non-uniform":
        return dcfx.DeepCacheConfig(
            interval=interval,
            schedule=kind,
            center=draw(st.integers(0, 40)),
            power=draw(st.floats(1.05, 2.0)),
        )
    if kind == "explicit":
        return dcfx.DeepCacheConfig(schedule=kind, full_steps=draw(st.lists(st.integers(0, 60), max_size=10)))
    if kind == "window":
        start = draw(st.integers(0, 30))
        stop = draw(st.none() | st.integers(start + 1, 70))
        return dcfx.DeepCacheConfig(interval=interval, schedule=kind, start=start, stop=stop)
    return dcfx.DeepCacheConfig(interval=interval)


def expected_full_count(cfg: dcfx.DeepCacheConfig, steps: int) -> int | None:
    if cfg.schedule in ("uniform", "non-uniform"):
        return math.ceil(steps / cfg.interval)
    return None


@FAST
@given(cfg=configs(), steps=st.integers(1, 60))
def test_schedule_invariants(cfg, steps):
    if cfg.schedule == "non-uniform" and cfg.center >= steps:
        with pytest.raises(ValueError, match="is outside the"):
            full_step_indices(cfg, steps)
        return
    try:
        full = full_step_indices(cfg, steps)
    except ValueError as e:
        assert cfg.schedule == "non-uniform" and "no power > 1" in str(e)
        with pytest.raises(ValueError):
            non_uniform_full_steps(steps, cfg.interval, cfg.center, cfg.power)
        return
    assert full[0] == 0 and full == sorted(set(full)) and all(0 <= i < steps for i in full)
    count = expected_full_count(cfg, steps)
    if count is not None:
        assert len(full) == count
    if cfg.schedule == "uniform":
        assert full == list(range(0, steps, cfg.interval))
    elif cfg.schedule == "explicit":
        assert set(full) == {0} | {i for i in cfg.full_steps if i < steps}
    elif cfg.schedule == "window":
        stop = steps if cfg.stop is None else cfg.stop
        for i in range(steps):
            inside = cfg.start <= i < stop
            assert (i in full) == (i == 0 or not inside or (i - cfg.start) % cfg.interval == 0), i
    if cfg.interval == 1 and cfg.schedule != "explicit":
        assert full == list(range(steps))


@pytest.fixture(scope="module")
def stub_unet():
    return tiny_sd()


def stub_runtime(unet, cfg, scheduler) -> DeepCacheUNet:
    """A runtime over graphs that only say which one ran: sample + 1 (full) or + 2 (shallow)."""

    return DeepCacheUNet(unet, cfg, spec_for(unet), StubBuild(), scheduler=scheduler)


class StubBuild:
    """One pair per input signature (the ``Build`` protocol) over the stub graphs."""

    def bucket(self, names, tensors):
        return None

    def __call__(self, names, tensors, forecast=False):
        return CompiledPair(full=lambda *a: (a[0] + 1, a[0][:, :1]), shallow=lambda *a: a[0] + 2)


@pytest.mark.slow
@FAST
@given(cfg=configs(), steps=st.integers(1, 40), generations=st.integers(1, 3))
def test_the_runtime_follows_the_plan_call_by_call(stub_unet, cfg, steps, generations):
    if cfg.schedule == "non-uniform" and cfg.center >= steps:
        return
    try:
        want = full_step_indices(cfg, steps)
    except ValueError:
        return
    scheduler = DDIMScheduler()
    fast = stub_runtime(stub_unet, cfg, scheduler)
    call = example_call(stub_unet, batch=1, size=8)
    for _ in range(generations):
        scheduler.set_timesteps(steps)
        kinds = [float((fast(**dict(call, timestep=t)).sample - call["sample"]).mean()) for t in scheduler.timesteps]
        assert [i for i, k in enumerate(kinds) if k == 1.0] == want
        assert all(k in (1.0, 2.0) for k in kinds)


_RUNTIMES: dict = {}


@pytest.mark.slow
@examples(8)
@given(
    branch=st.integers(0, 8),
    interval=st.integers(2, 5),
    steps=st.integers(3, 12),
    seed=st.integers(0, 1000),
)
def test_equals_the_reference_helper(branch, interval, steps, seed):
    # The tiny SD layout has 3 layers per up block: the helper's numbering is dcfx's.
    pipe = make_sd_pipeline()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        want = run_sd(pipe, steps=steps, seed=seed)
    finally:
        helper.disable()
    if branch not in _RUNTIMES:  # one graph build per branch, shared by the examples
        _RUNTIMES[branch] = dcfx.enable(make_sd_pipeline(), branch=branch, interval=interval)
    ours = _RUNTIMES[branch]
    ours.unet.reschedule(interval=interval)
    got = run_sd(ours, steps=steps, seed=seed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
