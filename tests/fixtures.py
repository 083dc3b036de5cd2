"""Tiny U-Nets of every supported layout and the pipelines around them (CPU, seconds)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

TWO_BLOCKS = {
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}


def tiny_unet(seed: int = 0, **config) -> UNet2DConditionModel:
    """A UNet2DConditionModel of tiny widths; ``config`` overrides the two-block SD layout."""
    torch.manual_seed(seed)
    defaults = {
        **TWO_BLOCKS,
        "layers_per_block": 2,
        "sample_size": 16,
        "cross_attention_dim": 8,
        "norm_num_groups": 4,
        "attention_head_dim": 2,
    }
    return UNet2DConditionModel(**{**defaults, **config}).eval()


def tiny_sd(layers_per_block: int = 2, seed: int = 0) -> UNet2DConditionModel:
    """SD 1.x layout: 3 blocks, cross-attention in the first two; L = layers_per_block + 1."""
    return tiny_unet(
        seed,
        block_out_channels=(8, 16, 16),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_sd2(seed: int = 0) -> UNet2DConditionModel:
    """SD 2.x layout: linear projections, a head dim per block."""
    return tiny_unet(seed, attention_head_dim=(2, 4), use_linear_projection=True)


def tiny_sdxl(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: text_time added conditioning, two transformer layers in the deep block."""
    return tiny_unet(
        seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )


def tiny_ddpm(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    """DDPM layout (UNet2DModel), optionally class-conditional (the LDM-4-G-like setting)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=num_class_embeds,
    ).eval()


UNET_FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "sd": tiny_sd,
    "sd-lpb1": lambda: tiny_sd(layers_per_block=1),
    "sd2": tiny_sd2,
    "sdxl": tiny_sdxl,
    "ddpm": tiny_ddpm,
    "ddpm-class": lambda: tiny_ddpm(num_class_embeds=10),
}


def example_call(unet: torch.nn.Module, batch: int = 2, size: int = 16, seed: int = 0) -> dict:
    """Returns keyword arguments of one U-Net call with seeded random inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    call: dict = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor(437),
    }
    if isinstance(unet, UNet2DConditionModel):
        call["encoder_hidden_states"] = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
        if cfg.addition_embed_type == "text_time":
            call["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, 8, generator=g),
                "time_ids": torch.randn(batch, 6, generator=g),
            }
    if getattr(cfg, "num_class_embeds", None):
        call["class_labels"] = torch.arange(batch) % cfg.num_class_embeds
    return call


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    ).eval()


def make_sd_pipeline(unet: UNet2DConditionModel | None = None, scheduler=None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet if unet is not None else tiny_sd(),
        scheduler=scheduler if scheduler is not None else DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sd(pipe: StableDiffusionPipeline, steps: int = 10, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Returns the output latents of a fixed-seed generation with classifier-free guidance."""
    g = torch.Generator().manual_seed(1234)
    dim = pipe.unet.config.cross_attention_dim
    cond = torch.randn(1, 7, dim, generator=g)
    uncond = torch.randn(1, 7, dim, generator=g)
    return pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    ).images


def make_ddim_pipeline(unet: UNet2DModel | None = None) -> DDIMPipeline:
    pipe = DDIMPipeline(unet=unet if unet is not None else tiny_ddpm(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ddim(pipe: DDIMPipeline, steps: int = 10, seed: int = 0) -> torch.Tensor:
    """Returns the output images of a fixed-seed DDIM generation as a numpy-free tensor."""
    out = pipe(num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(out.images)


def _ldm_unet(seed: int, **config) -> torch.nn.Module:
    # The latent-diffusion UNetModel (stable-diffusion-sdkit, installed with --no-deps); tests
    # that use it importorskip ldm first. Its zero-initialised layers (the output conv, each
    # ResBlock's last conv, each transformer's proj_out) get random weights: with them at zero
    # every output is 0 and no comparison could fail.
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(image_size=16, model_channels=32, dropout=0.0, **config).eval()
    with torch.no_grad():
        for param in unet.parameters():
            if not param.any():
                param.normal_(0.0, 0.1)
    return unet


def tiny_ldm_text(seed: int = 0, **overrides) -> torch.nn.Module:
    """A text-conditional latent-diffusion UNetModel (SD 1.x layout): spatial transformers, context_dim 24.

    Two levels of 32 and 64 channels, two res blocks each: 6 output blocks, 3 per level.
    """
    config = {
        "in_channels": 4,
        "out_channels": 4,
        "num_res_blocks": 2,
        "attention_resolutions": (1,),
        "channel_mult": (1, 2),
        "num_head_channels": 16,
        "use_spatial_transformer": True,
        "context_dim": 24,
        "legacy": False,
    }
    return _ldm_unet(seed, **{**config, **overrides})


def tiny_ldm_class(seed: int = 0, **overrides) -> torch.nn.Module:
    """A class-conditional latent-diffusion UNetModel: ``num_classes`` and ``y``, self-attention blocks.

    3 channels (as LDM-4-G), ResBlocks that resample and scale-shift norms (the ADM options):
    two levels, two res blocks each, 6 output blocks.
    """
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "num_res_blocks": 2,
        "attention_resolutions": (2,),
        "channel_mult": (1, 2),
        "num_heads": 2,
        "num_classes": 10,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
    }
    return _ldm_unet(seed, **{**config, **overrides})


class WrappedBuild:
    """A runtime's build whose calls go through ``around(build, names, tensors, **kwargs)``.

    Tests count, slow down or fault the builds through it; ``bucket`` stays the build's own.
    """

    def __init__(self, build, around: Callable) -> None:
        self.build = build
        self.around = around

    def bucket(self, names, tensors):
        return self.build.bucket(names, tensors)

    def __call__(self, names, tensors, **kwargs):
        return self.around(self.build, names, tensors, **kwargs)


def wrap_build(runtime, around: Callable) -> None:
    """Routes ``runtime``'s graph builds through ``around`` (see ``WrappedBuild``)."""
    graphs = runtime._rt.graphs
    graphs.build = WrappedBuild(graphs.build, around)
