"""Tiny random-weight diffusion transformers and their pipelines (no download, no text encoders).

Configs after diffusers' own tests (tests/models/transformers/), with >= 4 blocks so that a
block range can be cut. Pipelines run with prompt embeddings passed in and ``output_type="latent"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MODELS = ("sd3", "flux", "pixart", "dit", "sana", "wan")


@dataclass
class Tiny:
    """A tiny pipeline and the keyword arguments of one generation (without seed and steps)."""

    name: str
    pipe: Any
    call: dict[str, Any]

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def calls_per_step(self) -> int:
        """Transformer calls per step: 2 where the pipeline calls once per guidance branch (Wan)."""
        return 2 if self.name == "wan" and self.call.get("guidance_scale", 1) > 1 else 1

    def cache_dit_config(self, first: int, last: int, mask: list[int]) -> Any:
        """cache-dit's DBCache with the static step ``mask`` (1: full step): what dcfx's cut equals.

        Wan's two calls per step get a residual each and both read ``mask[i]``
        (``enable_separate_cfg``), as dcfx's lanes do.
        """
        import cache_dit

        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=first,
            Bn_compute_blocks=last,
            steps_computation_mask=list(mask),
            steps_computation_policy="static",
            num_inference_steps=len(mask),
            max_warmup_steps=1,
            residual_diff_threshold=0.0,
            enable_separate_cfg=self.calls_per_step > 1,
        )

    def recorded_call(self) -> dict[str, Any]:
        """Returns the first transformer call of a plain two-step generation, as the pipeline makes it.

        ``return_dict`` and the arguments passed as None are left out.
        """
        seen: dict[str, Any] = {}

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault("call", dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments))

        handle = self.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.generate(2)
        finally:
            handle.remove()
        return {k: v for k, v in seen["call"].items() if k != "return_dict" and v is not None}

    def generate(self, steps: int, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        """Returns the latents of one generation."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = self.pipe(**self.call, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs)
        images = out.frames if hasattr(out, "frames") else out.images
        return images if isinstance(images, torch.Tensor) else torch.as_tensor(images)


def _vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=latent_channels,
        norm_num_groups=1,
    )


def sd3(layers: int = 4, guidance: float = 2.0) -> Tiny:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    g = torch.Generator().manual_seed(1)
    call = {
        "prompt_embeds": torch.randn(1, 7, 32, generator=g),
        "negative_prompt_embeds": torch.randn(1, 7, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 64, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 64, generator=g),
        "guidance_scale": guidance,
        "height": 16,
        "width": 16,
    }
    return Tiny("sd3", pipe, call)


def flux(layers: int = 2, single_layers: int = 2, guidance: float = 3.5, guidance_embeds: bool = False) -> Tiny:
    """Flux-schnell's layout; with ``guidance_embeds`` Flux-dev's, whose transformer takes the guidance scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    g = torch.Generator().manual_seed(1)
    call = {
        "prompt_embeds": torch.randn(1, 7, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "guidance_scale": guidance,
        "height": 16,
        "width": 16,
    }
    return Tiny("flux-dev" if guidance_embeds else "flux", pipe, call)


def flux_dev(layers: int = 2, single_layers: int = 2, guidance: float = 3.5) -> Tiny:
    """Flux-dev: guidance distilled into the transformer (FluxPipeline passes it a ``guidance`` tensor)."""
    return flux(layers, single_layers, guidance, guidance_embeds=True)


def pixart(layers: int = 4, guidance: float = 4.5) -> Tiny:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    ).eval()
    pipe = PixArtAlphaPipeline(
        transformer=transformer, scheduler=DPMSolverMultistepScheduler(), vae=_vae(4), text_encoder=None, tokenizer=None
    )
    g = torch.Generator().manual_seed(1)
    call = {
        "prompt_embeds": torch.randn(1, 7, 32, generator=g),
        "prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(1, 7, 32, generator=g),
        "negative_prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
        "guidance_scale": guidance,
        "height": 16,
        "width": 16,
        "use_resolution_binning": False,
        "negative_prompt": None,
    }
    return Tiny("pixart", pipe, call)


def dit(
    layers: int = 4,
    guidance: float = 4.0,
    sample_size: int = 8,
    heads: int = 2,
    head_dim: int = 8,
    labels: tuple[int, ...] = (1, 3),
) -> Tiny:
    """A DiT pipeline (tiny by default; the sizes make DiT-XL/2's for the speed benchmark)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=sample_size,
        num_layers=layers,
        patch_size=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,  # DiTPipeline guides with the null class 1000
        norm_type="ada_norm_zero",
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(4), scheduler=DDIMScheduler())
    return Tiny("dit", pipe, {"class_labels": list(labels), "guidance_scale": guidance})


def sana(layers: int = 4, guidance: float = 4.5) -> Tiny:
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
    ).eval()
    pipe = SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    g = torch.Generator().manual_seed(1)
    call = {
        "prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "prompt_attention_mask": torch.ones(1, 6),
        "negative_prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "negative_prompt_attention_mask": torch.ones(1, 6),
        "guidance_scale": guidance,
        "height": 128,  # latents 4x4 (no VAE: the pipeline's default scale factor of 32)
        "width": 128,
        "use_resolution_binning": False,
        "negative_prompt": None,
    }
    return Tiny("sana", pipe, call)


def wan(layers: int = 4, guidance: float = 5.0) -> Tiny:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    g = torch.Generator().manual_seed(1)
    call = {
        "prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "guidance_scale": guidance,
        "height": 32,
        "width": 32,
        "num_frames": 5,
    }
    return Tiny("wan", pipe, call)


BUILDERS: dict[str, Callable[..., Tiny]] = {
    "sd3": sd3,
    "flux": flux,
    "flux-dev": flux_dev,  # not in MODELS: its own tests (test_transformers.py)
    "pixart": pixart,
    "dit": dit,
    "sana": sana,
    "wan": wan,
}
