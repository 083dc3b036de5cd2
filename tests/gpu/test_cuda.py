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
    assert fast._cache.device.type == "cuda"
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_cuda_fp16():
    unet = tiny_sd().cuda().half()
    scheduler = DDIMScheduler()
    ref = loop(unet, scheduler, torch.float16, steps=1)
    out = loop(dcfx.compile(unet, branch=0, interval=2, scheduler=scheduler), scheduler, torch.float16, steps=1)
    cos = torch.nn.functional.cosine_similarity(out.flatten().float(), ref.flatten().float(), dim=0)
    assert cos > 0.999
