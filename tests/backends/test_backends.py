"""Backends: the registry, eager identity, Inductor without recompiles."""

import pytest
import torch
import torch._dynamo
from diffusers import DDIMScheduler

import dcfx
from dcfx.backends import available_backends, get_backend
from tests.fixtures import tiny_sd, tiny_unet
from tests.test_runtime import Recorder, denoise


def test_registry_lists_and_rejects():
    assert {"eager", "inductor"} <= set(available_backends())
    with pytest.raises(ValueError, match="registered: eager, inductor"):
        get_backend("onnx")


def test_a_registered_backend_is_used_by_compile():
    seen = []

    @dcfx.register_backend("recording-test", options=("tag",))
    def recording(full, shallow, example_inputs, tag=None):
        seen.append((tag, len(example_inputs)))
        return get_backend("eager")(full, shallow, example_inputs)

    unet = tiny_sd()
    fast = dcfx.compile(unet, backend="recording-test", tag="x")
    denoise(fast, DDIMScheduler(), steps=2)
    assert seen == [("x", 3)]


@pytest.mark.slow
def test_inductor_steps_never_recompile_and_match_eager():
    unet = tiny_unet()
    scheduler = DDIMScheduler()
    eager = denoise(dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler), scheduler, steps=7)
    fast = dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler, backend="inductor")
    rec = Recorder(fast)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = denoise(fast, scheduler, steps=7)
        second = denoise(fast, scheduler, steps=7)
    assert rec.calls.count("full") == 6 and rec.calls.count("shallow") == 8
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    # Freezing is in effect (weights folded at compile time, not read per call): a weight
    # changed afterwards moves the eager output but not the compiled one.
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    try:
        moved = denoise(dcfx.compile(unet, branch=1, interval=3, scheduler=scheduler), scheduler, steps=7)
        assert (moved - eager).abs().max() > 1e-3
        torch.testing.assert_close(denoise(fast, scheduler, steps=7), first, atol=0, rtol=0)
    finally:
        with torch.no_grad():
            unet.conv_out.bias.sub_(1.0)
