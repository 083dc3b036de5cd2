"""Exports shared by the export tests: made once per session (each takes tens of seconds)."""

from __future__ import annotations

import pytest
import torch

import dcfx
from tests.fixtures import tiny_unet

# Dynamic batch, height, width and prompt length around the pipelines' sizes (the tiny U-Net
# downsamples by 2; the pipelines' prompts are 7 tokens).
SD_SHAPES = {"batch": (1, 2, 4), "height": (8, 16, 32), "width": (8, 16, 32), "tokens": (3, 7, 21)}
SD_BRANCH = 1


def sd_unet() -> torch.nn.Module:
    return tiny_unet(layers_per_block=1)


def sd_example(batch: int = 2, size: int = 16, seed: int = 0) -> dict:
    """A call like the test pipelines' (prompt embeddings of 7 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, 7, 8, generator=g),
    }


def forecast_case(batch: int = 2, height: int = 16, width: int = 16, seed: int = 7) -> tuple[torch.Tensor, dict]:
    """Returns the initial latents and the conditioning of a forecast sampling loop."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    return x, {"encoder_hidden_states": torch.randn(batch, 7, 8, generator=g)}


def sample_loop(unet, scheduler, call, x, steps=10):
    """Denoises ``x`` with ``unet`` (a dcfx runtime) and ``scheduler``; returns the final latents."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(**dict(call, sample=x, timestep=t)).sample, t, x).prev_sample
    return x


def export_sd(out, **overrides):
    """Exports the tiny SD-layout U-Net (branch SD_BRANCH, N=3, the pipelines' prompt length)."""
    options = {"branch": SD_BRANCH, "interval": 3, "format": "onnx", "shapes": SD_SHAPES, "example": sd_example()}
    return dcfx.export(sd_unet(), out, progress=False, **{**options, **overrides})


@pytest.fixture(scope="session")
def onnx_sd(tmp_path_factory):
    """The tiny SD-layout U-Net exported to ONNX with dynamic batch, height and width."""
    return export_sd(tmp_path_factory.mktemp("onnx") / "sd")
