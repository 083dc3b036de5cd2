"""Every optional U-Net input enters both graphs as a tensor: timestep_cond, class labels,
SDXL's added conditioning, ControlNet's residuals."""

import pytest
import torch
from diffusers import UNet2DConditionModel

import dcfx
from tests.fixtures import example_call, tiny_sdxl, tiny_unet
from tests.test_runtime import Recorder


def tiny_conditioned() -> UNet2DConditionModel:
    """SD layout with LCM's timestep_cond and a class embedding."""
    return tiny_unet(time_cond_proj_dim=6, num_class_embeds=5)


def residuals(unet, call, scale):
    """ControlNet-like residuals: one per skip (conv_in, each down resnet and downsampler), one for the mid block."""
    g = torch.Generator().manual_seed(int(scale * 100))
    size = call["sample"].shape[-1]
    shapes = [(2, unet.config.block_out_channels[0], size, size)]
    for channels, block in zip(unet.config.block_out_channels, unet.down_blocks, strict=False):
        shapes += [(2, channels, size, size)] * len(block.resnets)
        if block.downsamplers is not None:
            size //= 2
            shapes.append((2, channels, size, size))
    down = tuple(scale * torch.randn(s, generator=g) for s in shapes)
    mid = scale * torch.randn(2, unet.config.block_out_channels[-1], size, size, generator=g)
    return down, mid


def steps(fast, unet, calls):
    """Runs ``calls`` as consecutive steps; returns (dcfx outputs, plain outputs)."""
    outs = [fast(**c).sample for c in calls]
    plain = [unet(**c).sample for c in calls]
    return outs, plain


def test_timestep_cond_and_class_labels():
    unet = tiny_conditioned()
    base = example_call(unet)
    g = torch.Generator().manual_seed(3)
    calls = [
        {**base, "timestep": t, "timestep_cond": torch.randn(2, 6, generator=g), "class_labels": torch.tensor([1, 4])}
        for t in (900, 800)
    ]
    fast = dcfx.compile(unet, branch=0, interval=2)
    rec = Recorder(fast)
    outs, plain = steps(fast, unet, calls)
    assert rec.calls == ["full", "shallow"]
    torch.testing.assert_close(outs[0], plain[0], atol=0, rtol=0)
    assert (outs[1] - plain[1]).abs().max() > 0  # the shallow step reused the cache


def test_sdxl_added_conditioning_is_exact_on_full_steps():
    unet = tiny_sdxl()
    call = example_call(unet)
    fast = dcfx.compile(unet, branch=2, interval=1)
    torch.testing.assert_close(fast(**call).sample, unet(**call).sample, atol=0, rtol=0)


@pytest.mark.parametrize("branch", [0, 3])
def test_controlnet_residuals_are_graph_inputs_and_fresh_on_shallow_steps(branch):
    unet = tiny_conditioned()
    base = example_call(unet)
    base["timestep_cond"] = torch.zeros(2, 6)
    first, second = ({**base, "timestep": t} for t in (900, 800))
    for call, scale in ((first, 0.5), (second, 0.7)):
        call["down_block_additional_residuals"], call["mid_block_additional_residual"] = residuals(unet, call, scale)
    fast = dcfx.compile(unet, branch=branch, interval=2)
    out_full = fast(**first).sample
    torch.testing.assert_close(out_full, unet(**first).sample, atol=0, rtol=0)
    out_shallow = fast(**second).sample
    # Changing a residual of a skip the shallow graph consumes changes its output: it is read fresh.
    fast.reset()
    fast(**first)
    bumped = dict(second)
    bumped["down_block_additional_residuals"] = (
        second["down_block_additional_residuals"][0] + 1.0,
        *tuple(second["down_block_additional_residuals"][1:]),
    )
    assert (fast(**bumped).sample - out_shallow).abs().max() > 1e-4
    assert fast.stats == {"full": 2, "shallow": 2}
