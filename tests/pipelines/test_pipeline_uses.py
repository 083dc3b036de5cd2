"""What diffusers pipelines do around the U-Net, done to a pipeline after ``dcfx.enable``, on that same object.

Each use is taken as users meet it: dcfx enabled first, a generation, then the use (a new
scheduler, custom timesteps, a refiner sharing the U-Net, saving the pipeline, type checks,
IP-Adapter masks). At interval 1 every step is full and dcfx must give the plain pipeline's
output exactly; at interval 3 the reference helper's (DeepCacheSDHelper, on the same objects).
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import IPAdapterMaskProcessor

import dcfx
from tests.pipelines.builders import (
    _generate,
    _pooled,
    _seeded,
    ip_image_embeds,
    make_ip_adapter,
    make_sd,
    make_sdxl,
    run_txt2img,
    run_with_helper,
)

SCHEDULERS = {"euler": EulerDiscreteScheduler, "lcm": LCMScheduler, "dpm++": DPMSolverMultistepScheduler}


def _without_dcfx(pipe, run):
    """Returns ``run(pipe)`` on the plain U-Net, then puts the runtime back."""
    runtime = pipe.unet
    pipe.unet = runtime.model
    try:
        return run(pipe)
    finally:
        pipe.unet = runtime


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_scheduler_replaced_after_enable_is_followed(kind):
    pipe = make_sd()
    dcfx.enable(pipe, branch=0, interval=3)
    run_txt2img(pipe)  # a first generation with the pipeline's own scheduler
    pipe.scheduler = SCHEDULERS[kind].from_config(pipe.scheduler.config)  # the line diffusers' docs show
    got = run_txt2img(pipe)
    assert pipe.unet.stats["shallow"] > 0
    want = _without_dcfx(pipe, lambda p: run_with_helper(p, run_txt2img, 0, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    pipe.unet.reschedule(interval=1)
    torch.testing.assert_close(run_txt2img(pipe), _without_dcfx(pipe, run_txt2img), atol=0, rtol=0)


# Align Your Steps (SD 1.5): ten timesteps, and the sigmas of an Euler sampler (floats between
# the training timesteps: the sampler's timesteps are interpolated).
AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
AYS_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("custom", [{"timesteps": AYS_TIMESTEPS}, {"sigmas": AYS_SIGMAS}], ids=["timesteps", "sigmas"])
def test_custom_timesteps_and_sigmas(custom):
    pipe = make_sd()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    dcfx.enable(pipe, branch=0, interval=3)

    def run(p):
        return _generate(p, height=32, width=32, **custom)

    got = run(pipe)
    assert pipe.unet.stats == {"full": 4, "shallow": 6}
    want = _without_dcfx(pipe, lambda p: run_with_helper(p, run, 0, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    pipe.unet.reschedule(interval=1)
    torch.testing.assert_close(run(pipe), _without_dcfx(pipe, run), atol=0, rtol=0)


SPLIT = 0.5  # the base denoises the first half, the refiner the rest


def _base_then_refiner(base, refiner, helper_interval=None):
    """The ensemble of expert denoisers: the base stops at SPLIT, the refiner (img2img) starts there."""
    prompts = {"prompt_embeds": _seeded(1, 1, 7, 8), "negative_prompt_embeds": _seeded(2, 1, 7, 8), **_pooled()}
    generator = torch.Generator().manual_seed(0)

    def stage(pipe, **inputs):
        def run(p):
            return p(**prompts, **inputs, num_inference_steps=10, output_type="latent", generator=generator).images

        return run(pipe) if helper_interval is None else run_with_helper(pipe, run, 0, helper_interval)

    latents = stage(base, denoising_end=SPLIT, height=32, width=32)
    return stage(refiner, image=latents, denoising_start=SPLIT)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DDIMScheduler], ids=["euler", "ddim"])
def test_an_sdxl_base_and_refiner_share_one_unet(scheduler):
    base = make_sdxl()
    dcfx.enable(base, branch=0, interval=3)
    refiner = StableDiffusionXLImg2ImgPipeline(**base.components)  # the base's U-Net runtime, shared
    refiner.set_progress_bar_config(disable=True)
    dcfx.enable(refiner)  # binds the shared runtime to the refiner's scheduler too
    assert refiner.unet is base.unet
    base.scheduler = scheduler.from_config(base.scheduler.config)  # each pipeline a scheduler of its own
    refiner.scheduler = scheduler.from_config(base.scheduler.config)
    got = _base_then_refiner(base, refiner)
    # Two generations of 5 steps, each starting with a full step: 0, 3 of the base and of the refiner.
    assert base.unet.stats == {"full": 4, "shallow": 6} and base.unet.graph_builds == 1
    runtime = base.unet
    base.unet = refiner.unet = runtime.model
    want = _base_then_refiner(base, refiner, helper_interval=3)
    plain = _base_then_refiner(base, refiner)
    base.unet = refiner.unet = runtime
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (plain - want).abs().max() > 1e-3
    runtime.reschedule(interval=1)
    torch.testing.assert_close(_base_then_refiner(base, refiner), plain, atol=0, rtol=0)


def test_the_refiner_first_after_binding_counts_its_own_steps():
    # Both pipelines bound, neither has run: the first call comes from the refiner, whose
    # scheduler is the one that set timesteps (the base's still has from_config's defaults).
    base = make_sdxl()
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    dcfx.enable(base, branch=0, interval=3)
    refiner = StableDiffusionXLImg2ImgPipeline(**{**base.components, "scheduler": DDIMScheduler()})
    refiner.set_progress_bar_config(disable=True)
    dcfx.enable(refiner)
    assert refiner.unet is base.unet
    prompts = {"prompt_embeds": _seeded(1, 1, 7, 8), "negative_prompt_embeds": _seeded(2, 1, 7, 8), **_pooled()}
    latents = _seeded(6, 1, 4, 4, 4)
    refiner(**prompts, image=latents, num_inference_steps=10, denoising_start=SPLIT, output_type="latent")
    assert refiner.unet.stats == {"full": 2, "shallow": 3}  # its 5 steps: full at 0 and 3


@pytest.mark.slow
def test_copies_of_a_pipeline_bound_runtime_hold_a_scheduler_of_their_own():
    pipe = make_sd()
    dcfx.enable(pipe, branch=0, interval=3)
    want = run_txt2img(pipe)
    for copy_of in (copy.deepcopy, lambda r: pickle.loads(pickle.dumps(r))):
        twin = copy_of(pipe.unet)
        assert type(twin.scheduler) is type(pipe.scheduler) and twin.scheduler is not pipe.scheduler
        other = make_sd()
        other.unet = twin
        other.scheduler = twin.scheduler
        torch.testing.assert_close(run_txt2img(other), want, atol=0, rtol=0)


@pytest.mark.slow
def test_a_saved_pipeline_holds_the_model_itself(tmp_path):
    pipe = make_sd()
    dcfx.enable(pipe, branch=0, interval=3)
    run_txt2img(pipe)
    plain = _without_dcfx(pipe, run_txt2img)
    pipe.save_pretrained(tmp_path / "plain")
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert json.loads((tmp_path / "plain" / "model_index.json").read_text())["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    # Plain diffusers loads it: the U-Net itself, no dcfx involved.
    absent = {"text_encoder": None, "tokenizer": None, "feature_extractor": None, "image_encoder": None}
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "plain", safety_checker=None, **absent)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DConditionModel
    torch.testing.assert_close(run_txt2img(loaded), plain, atol=0, rtol=0)
    dtypes = {"unet": torch.float64, "default": torch.float32}
    loaded = StableDiffusionPipeline.from_pretrained(
        tmp_path / "fp16", variant="fp16", torch_dtype=dtypes, safety_checker=None, **absent
    )
    assert loaded.unet.dtype == torch.float64 and loaded.vae.dtype == torch.float32
    # The pipeline that was saved still runs dcfx.
    assert isinstance(pipe.unet, dcfx.DeepCacheUNet) and run_txt2img(pipe).shape == plain.shape


@pytest.mark.slow
def test_a_dcfx_unet_passes_the_type_checks_pipelines_make():
    pipe = make_sd()
    dcfx.enable(pipe, branch=0, interval=3)
    unet = pipe.unet
    assert isinstance(unet, UNet2DConditionModel) and isinstance(unet, ModelMixin)
    assert isinstance(unet, dcfx.DeepCacheUNet) and type(unet) is dcfx.DeepCacheUNet
    assert repr(unet).startswith("DeepCacheUNet(")
    assert pipe.config["unet"] == ("diffusers", "UNet2DConditionModel")
    # diffusers' StableDiffusionMixin helpers reach the model through the drop-in.
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    freeu = run_txt2img(pipe)
    pipe.disable_freeu()
    assert (freeu - run_txt2img(pipe)).abs().max() > 1e-3


@pytest.mark.slow
def test_ip_adapter_masks_broadcast_as_the_model_broadcasts_them():
    pipe = make_ip_adapter()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    masks = IPAdapterMaskProcessor().preprocess([mask], height=32, width=32)  # batch 1, for every row

    def run(p):
        attention = {"ip_adapter_masks": [masks]}
        return _generate(
            p, ip_adapter_image_embeds=ip_image_embeds(), cross_attention_kwargs=attention, height=32, width=32
        )

    dcfx.enable(pipe, branch=0, interval=3)
    got = run(pipe)
    want = _without_dcfx(pipe, lambda p: run_with_helper(p, run, 0, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    unmasked = _without_dcfx(
        pipe, lambda p: _generate(p, ip_adapter_image_embeds=ip_image_embeds(), height=32, width=32)
    )
    plain = _without_dcfx(pipe, run)
    assert (plain - unmasked).abs().max() > 1e-3  # the mask counts
    pipe.unet.reschedule(interval=1)
    torch.testing.assert_close(run(pipe), plain, atol=0, rtol=0)
