"""Tiny random-weight diffusers pipelines: SDXL (and its img2img and ControlNet), ControlNet,
img2img, inpaint, SD 2.x v-prediction, LCM, DDPM, class-conditional UNet2DModel and SVD; SD with
an IP-Adapter and with a T2I-Adapter.

Built without text encoders or tokenizers: calls pass prompt embeddings (SDXL: also pooled ones).
Each ``CASES`` entry is (make the pipeline, run it with fixed seeds -> output latents, the
number of U-Net calls a run makes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    ControlNetModel,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    T2IAdapter,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from tests.fixtures import tiny_ddpm, tiny_sd, tiny_sd2, tiny_sdxl, tiny_unet, tiny_vae

STEPS = 10
SD_BLOCKS = {
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
}
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def run_with_helper(pipe, run: Callable, branch: int, interval: int) -> torch.Tensor:
    """Returns ``run(pipe)`` with the reference DeepCacheSDHelper enabled on ``pipe`` (then disabled)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run(pipe)
    finally:
        helper.disable()


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


_SDXL = {"text_encoder_2": None, "tokenizer_2": None}


def make_sdxl():
    return _sd_pipeline(StableDiffusionXLPipeline, tiny_sdxl(), EulerDiscreteScheduler(), **_SDXL)


def _pooled() -> dict[str, torch.Tensor]:
    return {"pooled_prompt_embeds": _seeded(4, 1, 8), "negative_pooled_prompt_embeds": _seeded(5, 1, 8)}


def run_sdxl(pipe) -> torch.Tensor:
    return _generate(pipe, **_pooled(), height=32, width=32)


def make_sdxl_img2img():
    scheduler = EulerDiscreteScheduler()
    return _sd_pipeline(
        StableDiffusionXLImg2ImgPipeline, tiny_sdxl(), scheduler, requires_aesthetics_score=False, **_SDXL
    )


def run_sdxl_img2img(pipe) -> torch.Tensor:
    return _generate(pipe, **_pooled(), image=_image(), strength=0.6)


def tiny_controlnet(**config) -> ControlNetModel:
    """A ControlNet for tiny_sd (or, with ``config``, another U-Net): its conditioning embedding keeps the size."""
    torch.manual_seed(1)
    defaults = {
        **SD_BLOCKS,
        "layers_per_block": 2,
        "cross_attention_dim": 8,
        "norm_num_groups": 4,
        "attention_head_dim": 2,
        "conditioning_embedding_out_channels": (4,),
    }
    net = ControlNetModel(**{**defaults, **config}).eval()
    # A fresh ControlNet's output convolutions are zero (residuals of zero: the pipeline would
    # equal plain SD). Random ones make the residuals count.
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.3)
    return net


def make_controlnet():
    return _sd_pipeline(StableDiffusionControlNetPipeline, tiny_sd(), controlnet=tiny_controlnet(), **_NO_SAFETY)


def make_sdxl_controlnet():
    unet = tiny_sdxl()
    keys = (
        "block_out_channels",
        "down_block_types",
        "transformer_layers_per_block",
        "attention_head_dim",
        "use_linear_projection",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    )
    controlnet = tiny_controlnet(**{k: unet.config[k] for k in keys})
    return _sd_pipeline(
        StableDiffusionXLControlNetPipeline, unet, EulerDiscreteScheduler(), controlnet=controlnet, **_SDXL
    )


def run_sdxl_controlnet(pipe) -> torch.Tensor:
    return _generate(pipe, **_pooled(), image=_image(), height=32, width=32)


def run_controlnet(pipe) -> torch.Tensor:
    return _generate(pipe, image=_image(), height=32, width=32)


def make_img2img():
    return _sd_pipeline(StableDiffusionImg2ImgPipeline, tiny_sd(), **_NO_SAFETY)


def run_img2img(pipe) -> torch.Tensor:
    # strength 0.6: the last 6 of 10 steps run; the schedule starts at the first of them.
    return _generate(pipe, image=_image(), strength=0.6)


def make_inpaint():
    unet = tiny_unet(in_channels=9, up_block_types=_SD_UP, **SD_BLOCKS)
    return _sd_pipeline(StableDiffusionInpaintPipeline, unet, **_NO_SAFETY)


def run_inpaint(pipe) -> torch.Tensor:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return _generate(pipe, image=_image(), mask_image=mask)


def make_sd2():
    """SD 2.x: linear projections, a head dim per block, v-prediction."""
    scheduler = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    return _sd_pipeline(StableDiffusionPipeline, tiny_sd2(), scheduler, **_NO_SAFETY)


def run_txt2img(pipe) -> torch.Tensor:
    return _generate(pipe, height=32, width=32)


def make_lcm():
    """LCM: guidance enters as ``timestep_cond`` (no classifier-free batch), 4 steps."""
    unet = tiny_unet(**SD_BLOCKS, up_block_types=_SD_UP, time_cond_proj_dim=8)
    return _sd_pipeline(LatentConsistencyModelPipeline, unet, LCMScheduler(), **_NO_SAFETY)


LCM_STEPS = 4


def run_lcm(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        prompt_embeds=_seeded(1, 1, 7, 8),
        num_inference_steps=LCM_STEPS,
        height=32,
        width=32,
        output_type="latent",
        generator=generator,
    )
    return out.images


def make_ddpm():
    pipe = DDPMPipeline(unet=tiny_ddpm(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ddpm(pipe) -> torch.Tensor:
    out = pipe(num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


class ClassConditionalPipeline:
    """The LDM-4-G-like setting: a class-conditional UNet2DModel with classifier-free guidance.

    diffusers has no pipeline for it; this is the loop its pipelines run (DDIM, guidance 4 on
    a batch of conditional and null-class rows), with the attributes the helper reads.
    """

    def __init__(self) -> None:
        self.unet = tiny_ddpm(num_class_embeds=11)  # 10 digits and the null class
        self.scheduler = DDIMScheduler()

    def __call__(self, labels: torch.Tensor, steps: int = STEPS, guidance: float = 4.0) -> torch.Tensor:
        n = labels.shape[0]
        x = _seeded(0, n, 3, 16, 16)
        null = torch.full_like(labels, 10)
        self.scheduler.set_timesteps(steps)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                out = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = out.chunk(2)
                x = self.scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        return x


def make_class_conditional():
    return ClassConditionalPipeline()


def run_class_conditional(pipe) -> torch.Tensor:
    return pipe(torch.tensor([3, 7]))


def tiny_image_encoder(projection_dim: int) -> CLIPVisionModelWithProjection:
    """A CLIP image encoder for 32x32 images whose image embeddings have ``projection_dim`` entries."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        intermediate_size=37,
        patch_size=4,
    )
    return CLIPVisionModelWithProjection(vision).eval()


SVD_FRAMES = 3


def tiny_svd_unet() -> UNetSpatioTemporalConditionModel:
    """An SVD U-Net (spatio-temporal blocks; GroupNorm of 32 groups fixes the widths at 32+)."""
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=SVD_FRAMES,
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=3 * 4,
    ).eval()


def make_svd():
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=tiny_image_encoder(projection_dim=32),
        unet=tiny_svd_unet(),
        scheduler=EulerDiscreteScheduler(
            prediction_type="v_prediction",
            use_karras_sigmas=True,
            timestep_type="continuous",
            sigma_min=0.002,
            sigma_max=700.0,
        ),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_svd(pipe) -> torch.Tensor:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = pipe(
        image,
        height=32,
        width=32,
        num_frames=SVD_FRAMES,
        num_inference_steps=STEPS,
        decode_chunk_size=SVD_FRAMES,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    return out.frames


# IP-Adapter: image embeddings of this width (the tiny image encoder's projection), one image.
IMAGE_EMBED_DIM = 6


def tiny_ip_adapter(unet, seed: int = 5) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter state dict for ``unet`` laid out like the published checkpoints, random weights.

    ``image_proj`` is diffusers' ``ImageProjection`` (one image embedding to 4 tokens);
    ``ip_adapter`` holds each cross-attention processor's ``to_k_ip`` and ``to_v_ip``, keyed
    1, 3, 5, ... in ``unet.attn_processors`` order, as ``load_ip_adapter`` reads them.
    """
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim

    def weight(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(*shape, generator=g)

    image_proj = {
        "proj.weight": weight(4 * dim, IMAGE_EMBED_DIM),
        "proj.bias": weight(4 * dim),
        "norm.weight": 1 + weight(dim),
        "norm.bias": weight(dim),
    }
    cross_attentions = [
        unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    ]
    ip_adapter = {}
    for i, attn in enumerate(cross_attentions):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = weight(attn.to_k.out_features, dim)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = weight(attn.to_v.out_features, dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_tiny_ip_adapter(pipe) -> None:
    """Loads ``tiny_ip_adapter`` into ``pipe`` through diffusers' loader (no download, no image encoder)."""
    unet = getattr(pipe.unet, "model", pipe.unet)  # the U-Net itself, also under dcfx
    pipe.load_ip_adapter(tiny_ip_adapter(unet), subfolder="", weight_name="", image_encoder_folder=None)


def make_sd():
    return _sd_pipeline(StableDiffusionPipeline, tiny_sd(), **_NO_SAFETY)


def make_ip_adapter():
    pipe = make_sd()
    load_tiny_ip_adapter(pipe)
    return pipe


def ip_image_embeds() -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` of one image: the negative and the positive embedding."""
    return [_seeded(9, 2, 1, IMAGE_EMBED_DIM)]


def run_ip_adapter(pipe) -> torch.Tensor:
    return _generate(pipe, ip_adapter_image_embeds=ip_image_embeds(), height=32, width=32)


def tiny_t2i_adapter() -> T2IAdapter:
    """A full T2I-Adapter for tiny_sd: one feature per down block, from the image at latent size.

    The tiny VAE does not downsample, so neither does the adapter's pixel unshuffle. Its
    convolutions are not zero-initialised: its features count from the start.
    """
    torch.manual_seed(2)
    channels = list(SD_BLOCKS["block_out_channels"])
    return T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=1).eval()


def make_t2i_adapter():
    # StableDiffusionPipeline turns DDIM's clip_sample off by itself, this pipeline does not:
    # off here too, so that no output is clamped and every difference shows.
    scheduler = DDIMScheduler(clip_sample=False)
    return _sd_pipeline(StableDiffusionAdapterPipeline, tiny_sd(), scheduler, adapter=tiny_t2i_adapter(), **_NO_SAFETY)


def run_t2i_adapter(pipe, scale: float = 1.0) -> torch.Tensor:
    return _generate(pipe, image=_image(), adapter_conditioning_scale=scale, height=32, width=32)


CASES: dict[str, tuple[Callable, Callable[..., torch.Tensor], int]] = {
    # name: (make the pipeline, run it, U-Net calls it makes)
    "sdxl": (make_sdxl, run_sdxl, STEPS),
    "controlnet": (make_controlnet, run_controlnet, STEPS),
    "img2img": (make_img2img, run_img2img, 6),
    "inpaint": (make_inpaint, run_inpaint, STEPS),
    "sdxl-img2img": (make_sdxl_img2img, run_sdxl_img2img, 6),
    "sdxl-controlnet": (make_sdxl_controlnet, run_sdxl_controlnet, STEPS),
    "sd2-v": (make_sd2, run_txt2img, STEPS),
    "lcm": (make_lcm, run_lcm, LCM_STEPS),
    "ddpm": (make_ddpm, run_ddpm, STEPS),
    "class-conditional": (make_class_conditional, run_class_conditional, STEPS),
    "svd": (make_svd, run_svd, STEPS),
}
