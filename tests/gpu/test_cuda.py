"""What needs a CUDA GPU: the runtime and Inductor on the device, fp16. Skipped without one."""

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.fixtures import tiny_sd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def loop(unet, scheduler, dtype, steps=10):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g, device="cuda", dtype=dtype)
    ehs = torch.randn(2, 7, 8, generator=g, device="cuda", dtype=dtype)
    scheduler.set_timesteps(steps, device="cuda")
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, ehs).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cuda_runtime_matches_the_cpu_semantics(backend):
    unet = tiny_sd().cuda()
    scheduler = DDIMScheduler()
    ref = loop(dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler), scheduler, torch.float32)
    fast = dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler, backend=backend)
    out = loop(fast, scheduler, torch.float32)
    assert fast.stats == {"full": 4, "shallow": 6}
    assert fast._state().cache.device.type == "cuda"
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_cuda_fp16():
    unet = tiny_sd().cuda().half()
    scheduler = DDIMScheduler()
    ref = loop(unet, scheduler, torch.float16, steps=1)
    out = loop(dcfx.compile(unet, branch=0, interval=2, scheduler=scheduler), scheduler, torch.float16, steps=1)
    cos = torch.nn.functional.cosine_similarity(out.flatten().float(), ref.flatten().float(), dim=0)
    assert cos > 0.999


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_steps_make_no_host_device_sync_with_the_scheduler(forecast):
    # The first step of a generation reads scheduler.timesteps once to find where it starts
    # (img2img starts late); every later step runs without a synchronising call (forecasting:
    # the coefficients are host floats, their tensors copied from pinned memory).
    unet = tiny_sd().cuda()
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, branch=0, interval=3, scheduler=scheduler, forecast=forecast)
    loop(fast, scheduler, torch.float32)  # graphs built
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g, device="cuda")
    ehs = torch.randn(2, 7, 8, generator=g, device="cuda")
    scheduler.set_timesteps(10, device="cuda")
    timesteps = list(scheduler.timesteps)  # indexed up front: iterating the tensor in the loop is not the runtime's
    with torch.no_grad():
        fast(x, timesteps[0], ehs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in timesteps[1:]:
                fast(x, t, ehs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert fast.stats["shallow"] > 0


def test_both_graphs_replay_as_cuda_graphs_with_the_cache_at_a_fixed_address():
    unet = tiny_sd().cuda()
    scheduler = DDIMScheduler()
    ref = loop(dcfx.compile(unet, branch=0, interval=3, scheduler=scheduler), scheduler, torch.float32)
    fast = dcfx.compile(unet, branch=0, interval=3, scheduler=scheduler, backend="inductor", mode="reduce-overhead")
    first = loop(fast, scheduler, torch.float32)
    address = fast._state().cache.data_ptr()
    second = loop(fast, scheduler, torch.float32)
    assert fast._state().cache.data_ptr() == address
    torch.testing.assert_close(first, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
