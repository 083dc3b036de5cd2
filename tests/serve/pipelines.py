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
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are single characters (77 tokens, as SD's)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARACTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


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


def tiny_vae(seed: int = 2) -> AutoencoderKL:
    """Two blocks: 2 image pixels per latent pixel per side; 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
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
