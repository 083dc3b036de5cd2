"""The models dcfx can name: built-in configurations, the bundled digits models, diffusers folders.

``sd15`` is the Stable Diffusion v1.5 U-Net layout (860 M parameters) and ``small-sd`` keeps its
block structure at a width that runs in seconds on a CPU, both with seeded random weights (no
download); ``digits`` is the trained U-Net that ships with dcfx (``dcfx.digits``) and
``digits-dit`` the trained diffusion transformer beside it (``dcfx.digits_dit``). ``load_unet``
takes any of these names or a local diffusers folder (a U-Net's or a transformer's, or a
pipeline's holding one): every ``dcfx`` command and ``dcfx.tune`` load their ``--model``
through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dcfx.models import spec_for

if TYPE_CHECKING:
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

BUNDLED = "digits"
BUNDLED_DIT = "digits-dit"


def model_names() -> list[str]:
    """Returns the model names ``load_unet`` knows without a folder: the bundled models, then the configs."""
    return [BUNDLED, BUNDLED_DIT, *CONFIGS]


def build_unet(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Returns the built-in U-Net ``name`` with seeded random weights, in eval mode."""
    from diffusers import UNet2DConditionModel  # here: importing dcfx must not need diffusers (dcfx.load)

    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; built in: {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**CONFIGS[name]).to(dtype).eval()


def typical_shapes(model: str | os.PathLike[str]) -> dict[str, Any]:
    """Returns the call sizes a model's own generation uses where they differ from a U-Net's typical call.

    The built-in example call of an export has a 77-token prompt (CLIP) and batches of 1 to 4;
    the digits model and folders written like it (``class_tokens.safetensors`` beside the
    U-Net) read ``dcfx.digits.TOKENS`` class tokens and generate many digits at once (the
    demo's 40, doubled by guidance), so their exports take that prompt length and those batches.
    The digits transformer reads class labels, not a prompt: only its batches differ.
    """
    name = os.fspath(model)
    if name == BUNDLED or (os.path.isdir(name) and (Path(name) / "class_tokens.safetensors").is_file()):
        from dcfx.digits import BATCH_RANGE, TOKENS

        return {"tokens": TOKENS, "batch": BATCH_RANGE}
    if name == BUNDLED_DIT:  # class labels, no prompt: only the demo's batches
        from dcfx.digits import BATCH_RANGE

        return {"batch": BATCH_RANGE}
    return {}


# A pipeline folder's subfolders that hold its denoiser, in the order they are looked for.
DENOISER_FOLDERS = ("unet", "transformer")


def denoiser_folder(model: str | os.PathLike[str]) -> Path:
    """Returns the folder of a denoiser's config.json: a pipeline's ``unet/`` or ``transformer/``, else ``model``."""
    for name in DENOISER_FOLDERS:
        sub = Path(model) / name
        if sub.is_dir():
            return sub
    return Path(model)


def check_model(model: str | os.PathLike[str]) -> None:
    """Raises ValueError unless ``model`` is a name ``load_unet`` knows or an existing folder (nothing is loaded)."""
    name = os.fspath(model)
    if name not in model_names() and not os.path.isdir(name):
        raise ValueError(
            f"model {name!r} is neither a built-in model ({', '.join(model_names())}) nor a diffusers folder"
        )


def load_unet(model: str | os.PathLike[str]) -> nn.Module:
    """Returns the U-Net (or diffusion transformer) named by ``model``, in eval mode.

    Args:
        model: ``"digits"`` (the bundled trained U-Net), ``"digits-dit"`` (the bundled trained
            transformer, a ``DiTTransformer2DModel``), a built-in config (``"sd15"``,
            ``"small-sd"``; random weights), or a local diffusers folder: a pipeline folder
            with a ``unet/`` or a ``transformer/`` subfolder, or the model's own folder. Its
            ``config.json`` names the class (``UNet2DConditionModel``, ``UNet2DModel``,
            ``SD3Transformer2DModel``, ...).

    Example:
        >>> load_unet("digits").config.sample_size
        16

    Raises:
        ValueError: ``model`` is none of these, or its config.json cannot be read or names no
            diffusers model class.
        TypeError: the folder holds a model class dcfx does not support.
    """
    name = os.fspath(model)
    check_model(name)
    if name == BUNDLED:
        from dcfx.digits import load_model

        return load_model().unet
    if name == BUNDLED_DIT:
        from dcfx.digits_dit import load_model as load_dit

        return load_dit().transformer
    if name in CONFIGS:
        return build_unet(name)
    import diffusers

    folder = denoiser_folder(name)
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            class_name = json.load(f).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {folder}/config.json: {e}") from e
    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{folder}/config.json names {class_name!r}, which is not a diffusers model class")
    unet = cls.from_pretrained(folder).eval()
    spec_for(unet)  # a TypeError naming the supported classes, before any work
    return unet
