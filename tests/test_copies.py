"""Copies of a compiled U-Net (deepcopy, pickle, torch.save) start clean and run like a fresh one."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.fixtures import example_call, tiny_sd


def _torch_roundtrip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _pickle_roundtrip(module):
    return pickle.loads(pickle.dumps(module))


def _generation(runtime, call, steps=5):
    runtime.scheduler.set_timesteps(10)
    return [runtime(**dict(call, timestep=t)).sample for t in runtime.scheduler.timesteps[:steps]]


@pytest.mark.slow
@pytest.mark.parametrize("copy_it", [copy.deepcopy, _pickle_roundtrip, _torch_roundtrip])
def test_a_copy_made_mid_generation_starts_clean(copy_it):
    unet = tiny_sd()
    scheduler = DDIMScheduler()
    call = example_call(unet, batch=2, size=16)
    runtime = dcfx.compile(unet, branch=0, interval=3, scheduler=scheduler)
    want = _generation(runtime, call)  # 5 calls: full, shallow, shallow, full, shallow
    runtime.reset()
    _generation(runtime, call, steps=2)  # mid-generation: a cache exists, step 1 was shallow
    copied = copy_it(runtime)
    assert copied.stats == {"full": 0, "shallow": 0}
    assert copied.model is not unet and copied.scheduler is not scheduler
    got = _generation(copied, call)
    assert copied.stats == {"full": 2, "shallow": 3}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The copy has its own weights: changing them does not reach the original.
    with torch.no_grad():
        copied.model.conv_out.bias.add_(1.0)
    runtime.reset()
    for a, b in zip(_generation(runtime, call), want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
