"""Tiny Stable Diffusion pipeline folders with a real tokenizer and text encoder, built here (no download).

The tokenizer is a CLIP BPE tokenizer over single characters (lower-case letters, digits,
punctuation); the text encoder a 2-layer CLIP text model of width 8; the VAE has two blocks
(2 image pixels per latent pixel per side), so the default image is 32x32 from 16x16 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from tests.fixtures import tiny_sd, tiny_sdxl

CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
# Stable Diffusion 1.5's scheduler config (its folder's scheduler/scheduler_config.json).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are single characters (77 tokens, as SD's)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(width: int = 8, seed: int = 1, projection_dim: int | None = None) -> CLIPTextModel:
    """A 2-layer CLIP text model over ``tiny_tokenizer``; with ``projection_dim`` SDXL's second encoder."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(CHARACTERS),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim or width,
    )
    if projection_dim is not None:
        return CLIPTextModelWithProjection(config).eval()
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 2, shift_factor: float | None = None) -> AutoencoderKL:
    """Two blocks: 2 image pixels per latent pixel per side; 4 latent channels (SD3's VAE also shifts)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        shift_factor=shift_factor,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).eval()


def tiny_sd_pipeline(scheduler: str = "ddim", unet=None) -> StableDiffusionPipeline:
    """A tiny SD 1.x-layout pipeline with tokenizer, text encoder and VAE; scheduler "ddim" or "pndm"."""
    schedulers = {
        "ddim": lambda: DDIMScheduler(**SD15_SCHEDULER, clip_sample=False),
        "pndm": lambda: PNDMScheduler(**{**SD15_SCHEDULER, "skip_prk_steps": True}),
    }
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
        unet=unet if unet is not None else tiny_sd(),
        scheduler=schedulers[scheduler](),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_pipeline(folder: Path, scheduler: str = "ddim", unet=None) -> Path:
    """Saves ``tiny_sd_pipeline`` with ``save_pretrained``; returns the folder."""
    tiny_sd_pipeline(scheduler, unet).save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """A tiny SDXL-layout pipeline: two text encoders (widths 4 + 4 = the U-Net's cross-attention
    width 8; pooled projection 8), size micro-conditioning, zeros for an empty negative prompt."""
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(width=4, seed=1),
        text_encoder_2=tiny_text_encoder(width=4, seed=3, projection_dim=8),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_sdxl(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5_encoder(width: int = 16, seed: int = 4) -> T5EncoderModel:
    """A 1-layer T5 encoder over ``tiny_tokenizer`` (PixArt's text encoder; it attends with the padding mask)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=2 + 2 * len(CHARACTERS),
        d_model=width,
        d_kv=4,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        pad_token_id=1,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_pixart_pipeline(sigma: bool = False, sample_size: int = 8) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A tiny PixArt-alpha (or sigma) pipeline: T5 encoder of width 16, 4 blocks of width 24, the
    two-block VAE (default image 16x16 from 8x8 latents). ``sample_size`` 128 is PixArt-alpha
    1024's, where the pipeline conditions on the image's resolution and aspect ratio."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=4,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,  # width 24: a multiple of 3, as the size micro-conditioning needs
        in_channels=4,
        out_channels=8,  # a learned variance, as PixArt's
        cross_attention_dim=24,
        caption_channels=16,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=sample_size == 128,
    ).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tiny_tokenizer(300 if sigma else 120),
        text_encoder=tiny_t5_encoder(),
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline: two CLIP encoders with projections (widths 8 + 8: pooled 16), no T5
    (the pipeline's zeros for its 256 tokens, width 32), 4 joint blocks of width 16, the two-block
    VAE with a shift (default image 16x16 from 8x8 latents), flow matching."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=tiny_text_encoder(width=8, seed=1, projection_dim=8),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(width=8, seed=3, projection_dim=8),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
