"""Built-in U-Net configurations with random weights: no download needed.

``sd15`` is the Stable Diffusion v1.5 U-Net layout (860 M parameters); ``small-sd`` keeps its
block structure at a width that runs in seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        **_SD_BLOCKS,
        "block_out_channels": (320, 640, 1280, 1280),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "sample_size": 64,
    },
    "small-sd": {
        **_SD_BLOCKS,
        "block_out_channels": (32, 64, 128, 128),
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
}


def build_unet(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Returns the built-in U-Net ``name`` with seeded random weights, in eval mode."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; built in: {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**CONFIGS[name]).to(dtype).eval()
