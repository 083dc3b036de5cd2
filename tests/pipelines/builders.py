"""Tiny random-weight diffusers pipelines beyond plain SD: SDXL, ControlNet, img2img, inpaint.

Built without text encoders or tokenizers: calls pass prompt embeddings (SDXL: also pooled ones).
Each ``CASES`` entry is (make the pipeline, run it with fixed seeds -> output latents).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLPipeline,
)

from tests.fixtures import tiny_sd, tiny_sdxl, tiny_unet, tiny_vae

STEPS = 10
SD_BLOCKS = {
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
}
_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _sd_pipeline(cls, unet, scheduler=None, **components):
    """An SD-family pipeline without text encoder, tokenizer or safety checker, progress bar off."""
    pipe = cls(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler or DDIMScheduler(),
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **inputs) -> torch.Tensor:
    """Output latents of a fixed-seed run with seeded prompt embeddings (guidance on)."""
    prompts = {"prompt_embeds": _seeded(1, 1, 7, 8), "negative_prompt_embeds": _seeded(2, 1, 7, 8)}
    generator = torch.Generator().manual_seed(0)
    out = pipe(**prompts, **inputs, num_inference_steps=STEPS, output_type="latent", generator=generator)
    return out.images


def make_sdxl():
    return _sd_pipeline(
        StableDiffusionXLPipeline, tiny_sdxl(), EulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None
    )


def run_sdxl(pipe) -> torch.Tensor:
    pooled = {"pooled_prompt_embeds": _seeded(4, 1, 8), "negative_pooled_prompt_embeds": _seeded(5, 1, 8)}
    return _generate(pipe, **pooled, height=32, width=32)


def tiny_controlnet() -> ControlNetModel:
    """A ControlNet for tiny_sd: the same down blocks; its conditioning embedding keeps the size."""
    torch.manual_seed(1)
    return ControlNetModel(
        **SD_BLOCKS,
        layers_per_block=2,
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
        conditioning_embedding_out_channels=(4,),
    ).eval()


def make_controlnet():
    return _sd_pipeline(StableDiffusionControlNetPipeline, tiny_sd(), controlnet=tiny_controlnet(), **_NO_SAFETY)


def run_controlnet(pipe) -> torch.Tensor:
    return _generate(pipe, image=_image(), height=32, width=32)


def make_img2img():
    return _sd_pipeline(StableDiffusionImg2ImgPipeline, tiny_sd(), **_NO_SAFETY)


def run_img2img(pipe) -> torch.Tensor:
    # strength 0.6: the last 6 of 10 steps run; the schedule starts at the first of them.
    return _generate(pipe, image=_image(), strength=0.6)


def make_inpaint():
    up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet = tiny_unet(in_channels=9, up_block_types=up, **SD_BLOCKS)
    return _sd_pipeline(StableDiffusionInpaintPipeline, unet, **_NO_SAFETY)


def run_inpaint(pipe) -> torch.Tensor:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return _generate(pipe, image=_image(), mask_image=mask)


CASES: dict[str, tuple[Callable, Callable[..., torch.Tensor], int]] = {
    # name: (make the pipeline, run it, U-Net calls it makes)
    "sdxl": (make_sdxl, run_sdxl, STEPS),
    "controlnet": (make_controlnet, run_controlnet, STEPS),
    "img2img": (make_img2img, run_img2img, 6),
    "inpaint": (make_inpaint, run_inpaint, STEPS),
}
