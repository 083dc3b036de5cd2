"""The drop-in runtime: step tracking, generations, cache validity, the buffer, the graph cache."""

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import dcfx
from dcfx import graphs as graphs_module
from dcfx import planner as planner_module
from tests.fixtures import example_call, tiny_sdxl, tiny_unet, wrap_build


class Recorder:
    """Wraps a runtime's graph builder to log which graph ran at each call."""

    def __init__(self, runtime):
        self.calls: list[str] = []

        def recording_build(build, names, tensors, **kwargs):
            pair = build(names, tensors, **kwargs)

            def full(*args):
                self.calls.append("full")
                return pair.full(*args)

            def shallow(*args):
                self.calls.append("shallow")
                return pair.shallow(*args)

            return type(pair)(full=full, shallow=shallow)

        wrap_build(runtime, recording_build)

    def full_steps(self):
        return [i for i, kind in enumerate(self.calls) if kind == "full"]


def denoise(unet, scheduler, steps=10, size=16, batch=2, seed=0):
    """A plain DDIM loop; returns the final latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ehs = torch.randn(batch, 7, 8, generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, ehs).sample, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def test_drop_in_attributes_and_return_types(unet):
    fast = dcfx.compile(unet, branch=0, interval=2)
    assert fast.config is unet.config and fast.dtype == unet.dtype and fast.device == unet.device
    call = example_call(unet)
    out = fast(**call)
    assert isinstance(out, UNet2DConditionOutput)
    as_tuple = fast(**call, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(out.sample, unet(**call).sample, atol=0, rtol=0)
    sdxl = tiny_sdxl()
    assert dcfx.compile(sdxl).add_embedding is sdxl.add_embedding


def test_schedule_is_followed_and_generations_restart_cleanly(unet):
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler)
    rec = Recorder(fast)
    first = denoise(fast, scheduler)
    second = denoise(fast, scheduler)
    assert rec.full_steps() == [0, 3, 6, 9, 10, 13, 16, 19]
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert (first - denoise(unet, scheduler)).abs().max() > 1e-6  # caching changed something


def test_non_uniform_schedule_takes_the_step_count_from_the_scheduler(unet):
    scheduler = DDIMScheduler()
    cfg = dcfx.DeepCacheConfig(interval=3, schedule="non-uniform", center=5, power=1.5)
    fast = dcfx.compile(unet, cfg, scheduler=scheduler)
    rec = Recorder(fast)
    denoise(fast, scheduler, steps=20)
    assert rec.full_steps() == dcfx.schedule.non_uniform_full_steps(20, 3, 5, 1.5)[0]


def test_without_scheduler_a_non_descending_timestep_starts_a_generation(unet):
    fast = dcfx.compile(unet, branch=0, interval=10)
    rec = Recorder(fast)
    call = example_call(unet)
    for t in (900, 800, 700, 900, 800):
        fast(call["sample"], t, call["encoder_hidden_states"])
    assert rec.calls == ["full", "shallow", "shallow", "full", "shallow"]


def test_reset_forces_a_full_step(unet):
    fast = dcfx.compile(unet, branch=0, interval=10)
    rec = Recorder(fast)
    call = example_call(unet)
    fast(call["sample"], 900, call["encoder_hidden_states"])
    fast(call["sample"], 800, call["encoder_hidden_states"])
    fast.reset()
    fast(call["sample"], 700, call["encoder_hidden_states"])
    assert rec.calls == ["full", "shallow", "full"]


def test_reschedule_keeps_the_graphs_and_follows_the_new_schedule(unet):
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler)
    rec = Recorder(fast)
    builds = []
    wrap_build(fast, lambda build, names, tensors, **kw: builds.append(1) or build(names, tensors, **kw))
    denoise(fast, scheduler)
    call = example_call(unet)
    for t in scheduler.timesteps[:2]:  # mid-generation state that reschedule must drop
        fast(call["sample"], t, call["encoder_hidden_states"])
    rec.calls.clear()
    assert fast.reschedule(interval=5) is fast
    five = denoise(fast, scheduler)
    assert rec.full_steps() == [0, 5]
    assert len(builds) == 1  # one capture served both schedules
    fresh = dcfx.compile(unet, branch=1, interval=5, scheduler=scheduler)
    torch.testing.assert_close(five, denoise(fresh, scheduler), atol=0, rtol=0)
    rec.calls.clear()
    fast.reschedule(dcfx.DeepCacheConfig(branch=1, interval=1))
    torch.testing.assert_close(denoise(fast, scheduler), denoise(unet, scheduler), atol=1e-5, rtol=1e-5)
    assert rec.calls == ["full"] * 10


def test_reschedule_refuses_another_branch_and_bad_input(unet):
    fast = dcfx.compile(unet, branch=1, interval=3)
    with pytest.raises(ValueError, match="cut at branch 1"):
        fast.reschedule(branch=0)
    with pytest.raises(ValueError, match="step count"):
        fast.reschedule(dcfx.DeepCacheConfig(branch=1, schedule="non-uniform", center=5, power=1.5))
    with pytest.raises(TypeError, match="not both"):
        fast.reschedule(dcfx.DeepCacheConfig(branch=1), interval=2)
    with pytest.raises(ValueError, match="interval"):
        fast.reschedule(interval=0)
    assert fast.deepcache_config == dcfx.DeepCacheConfig(branch=1, interval=3)  # nothing changed


@pytest.mark.parametrize("change", ["resolution", "batch"])
def test_a_cache_that_does_not_fit_is_never_used(unet, change):
    fast = dcfx.compile(unet, branch=0, interval=10)
    rec = Recorder(fast)
    call = example_call(unet)
    fast(call["sample"], 900, call["encoder_hidden_states"])
    other = example_call(unet, size=24) if change == "resolution" else example_call(unet, batch=3)
    out = fast(other["sample"], 800, other["encoder_hidden_states"]).sample
    assert rec.calls == ["full", "full"]
    torch.testing.assert_close(out, unet(other["sample"], 800, other["encoder_hidden_states"]).sample, atol=0, rtol=0)
    fast(other["sample"], 700, other["encoder_hidden_states"])
    assert rec.calls[-1] == "shallow"


def test_a_dtype_change_through_the_runtime_is_a_full_step_in_the_new_dtype():
    unet = tiny_unet()
    fast = dcfx.compile(unet, branch=0, interval=10)
    rec = Recorder(fast)
    call = example_call(unet)
    fast(call["sample"], 900, call["encoder_hidden_states"])
    fast.double()  # moves the shared parameters: the graphs see the same objects
    assert unet.dtype == torch.float64
    sample, ehs = call["sample"].double(), call["encoder_hidden_states"].double()
    out = fast(sample, 800, ehs).sample
    assert rec.calls == ["full", "full"] and out.dtype == torch.float64
    torch.testing.assert_close(out, unet(sample, 800, ehs).sample, atol=0, rtol=0)
    fast(sample, 700, ehs)
    assert rec.calls[-1] == "shallow"


def test_the_cache_buffer_is_allocated_once(unet):
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=0, interval=2, scheduler=scheduler)
    denoise(fast, scheduler, steps=4)
    state = fast._state()
    address = state.cache.data_ptr()
    denoise(fast, scheduler, steps=6)
    assert state.cache.data_ptr() == address and state.cache is state.buffer


def test_graph_cache_is_bounded(unet, monkeypatch):
    monkeypatch.setattr(graphs_module, "MAX_GRAPH_PAIRS", 2)
    fast = dcfx.compile(unet, branch=0, interval=2)
    for size in (8, 16, 24):
        call = example_call(unet, size=size)
        fast(call["sample"], 900, call["encoder_hidden_states"])
    assert len(fast._rt.graphs.pairs) == 2
    assert fast._state().buffer.shape[-1] == 24  # one buffer per generation: the latest layout's


def test_step_plans_are_bounded(unet, monkeypatch):
    monkeypatch.setattr(planner_module, "MAX_STEP_PLANS", 2)
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, interval=2, schedule="non-uniform", center=1, scheduler=scheduler)
    rec = Recorder(fast)
    for steps in (6, 8, 10, 6):
        rec.calls.clear()
        denoise(fast, scheduler, steps=steps)
        assert rec.full_steps() == dcfx.schedule.non_uniform_full_steps(steps, 2, 1, 1.4)[0]
        assert len(fast.planner._plans) <= 2
    assert list(fast.planner._plans) == [10, 6]  # least recently used dropped first


def test_graphs_for_gives_the_pair_a_step_runs_without_taking_a_step(unet):
    fast = dcfx.compile(unet, branch=0, interval=2)
    call = example_call(unet)
    pair, inputs = fast.graphs_for(**call)
    assert fast.stats == {"full": 0, "shallow": 0} and fast.graph_builds == 1
    buffer = {}

    def buffer_for(shape, stride, dtype, device):
        return buffer.setdefault("b", torch.empty_strided(shape, stride, dtype=dtype, device=device))

    later = fast.graphs_for(**dict(call, timestep=300))[1]
    with torch.no_grad():
        sample, cache = pair.run_full(inputs, buffer_for)
        shallow = pair.run_shallow(later, cache)  # the next step reads the cache of this one
    assert cache is buffer["b"]
    torch.testing.assert_close(sample, fast(**call).sample, atol=0, rtol=0)
    torch.testing.assert_close(shallow, fast(**dict(call, timestep=300)).sample, atol=0, rtol=0)
    assert fast.graphs_for(**call)[0] is pair and fast.graph_builds == 1
