"""A transformer pipeline (PixArt) served by prompt, in-process, against the offline pipeline.

A tiny PixArt-alpha pipeline folder (T5 encoder and tokenizer built here, no download) saved
with ``save_pretrained``: the server loads it as a user's folder; the offline reference is the
same folder loaded by diffusers with the same dcfx config, seed and prompt, at
``use_resolution_binning=False`` (the server generates at the size asked: dcfx.serve.pipeline).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline

import dcfx
from dcfx.serve.engine import Engine, EngineConfig
from dcfx.serve.images import ImageRequest
from dcfx.serve.models import TransformerServeModel
from dcfx.serve.pipeline import TransformerPipelineServeModel, load_pipeline, load_served, prompt_servable
from dcfx.serve.service import PipelineService
from tests.serve.helpers import held
from tests.serve.pipelines import tiny_pixart_pipeline, tiny_sd3_pipeline
from tests.serve.test_pipeline_serving import _pixels, _png, assert_within_one_level

CONFIG = dcfx.DeepCacheConfig(first=1, last=0, interval=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pixart") / "pixart-alpha"
    tiny_pixart_pipeline().save_pretrained(path)
    return path


_OFFLINE: dict = {}


def offline(folder, config=CONFIG, **call) -> list[bytes]:
    """The pipeline loaded from ``folder`` with dcfx enabled: PNG bytes of each image (PixArt:
    without resolution binning)."""
    key = (str(folder), repr(config))
    if key not in _OFFLINE:  # loaded once per config, then reused (as a user reuses a pipeline)
        if "sd3" in folder.name:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
        else:
            pipe = (PixArtSigmaPipeline if "sigma" in folder.name else PixArtAlphaPipeline).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        _OFFLINE[key] = dcfx.enable(pipe, config)
    pipe = _OFFLINE[key]
    if "sd3" not in folder.name:
        call["use_resolution_binning"] = False
    seed = call.pop("seed")
    with torch.no_grad():
        images = pipe(**call, generator=torch.Generator().manual_seed(seed)).images
    return [_png(image) for image in images]


def service_of(folder, config=CONFIG, **engine) -> PipelineService:
    model = load_pipeline(folder)
    runtime = dcfx.compile(model.unet, config)
    return PipelineService(model, Engine(runtime, model, EngineConfig(**engine)))


@pytest.mark.slow  # the fast tier serves by prompt in tests/serve/test_pipeline_serving.py (SD)
def test_pixart_by_prompt_equals_the_offline_pipeline_then_concurrent_requests_share_stage_calls(folder):
    service = service_of(folder, max_batch=8, batch_sizes=(2, 4, 8))
    try:
        model = service.model
        assert isinstance(model, TransformerPipelineServeModel) and model.image_size() == (16, 16)
        # PixArt's defaults: guidance 4.5 (so the empty negative prompt is encoded too), 20 steps.
        assert service.texts(ImageRequest(prompt="a fox")) == ["a fox", ""]
        alone = service.submit(ImageRequest(prompt="a red fox", seed=3, steps=10)).result(timeout=120)
        expected = offline(folder, prompt="a red fox", seed=3, num_inference_steps=10)
        assert_within_one_level(alone.pngs[0], expected[0])
        assert (alone.generation.full_steps, alone.generation.shallow_steps) == (4, 6)  # the cut ran: 1:3
        assert _pixels(alone.pngs[0]).shape == (16, 16, 3)
        # One step: PixArt's pipeline returns the scheduler's other output there; refused by name.
        submitted = service.stats()["submitted"]
        with pytest.raises(ValueError, match="PixArtAlphaPipeline takes at least 2 steps, got 1"):
            service.submit(ImageRequest(prompt="a red fox", steps=1))
        assert service.stats()["submitted"] == submitted

        # n images, a negative prompt and a non-square size: the pipeline's num_images_per_prompt.
        request = ImageRequest(prompt="a red fox", negative_prompt="blurry", n=2, size=(16, 24), seed=5, steps=8)
        two = service.submit(request).result(timeout=120)
        reference = offline(
            folder,
            prompt="a red fox",
            negative_prompt="blurry",
            num_images_per_prompt=2,
            height=16,
            width=24,
            seed=5,
            num_inference_steps=8,
        )
        assert len(two.pngs) == 2 and two.pngs[0] != two.pngs[1]
        for served, want in zip(two.pngs, reference, strict=True):
            assert _pixels(served).shape == (16, 24, 3)
            assert_within_one_level(served, want)

        # Three requests at once after those: one text-encoder call for all of them (their prompt
        # masks differ: each row keeps its own), each image its offline image.
        prompts = ["a red fox", "a blue car in the rain", "tree"]
        with held(service.encoder, ["hold"]):
            futures = [service.submit(ImageRequest(prompt=p, seed=i, steps=6)) for i, p in enumerate(prompts)]
        results = [f.result(timeout=120) for f in futures]
        assert max(service.stats()["text_encoder_items_per_call"]) >= 3
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            (want,) = offline(folder, prompt=prompt, seed=i, num_inference_steps=6)
            assert_within_one_level(result.pngs[0], want)
    finally:
        service.close()


@pytest.mark.slow
def test_pixart_1024_layout_is_conditioned_on_the_size_asked(tmp_path):
    # sample_size 128 is PixArt-alpha 1024's: the pipeline passes the image's resolution and aspect
    # ratio to the transformer; served requests of two sizes carry their own.
    folder = tmp_path / "pixart-1024"
    tiny_pixart_pipeline(sample_size=128).save_pretrained(folder)
    service = service_of(folder, max_batch=4, batch_sizes=(2, 4))
    try:
        for size in ((16, 16), (16, 32)):
            got = service.submit(ImageRequest(prompt="a red fox", size=size, seed=1, steps=6)).result(timeout=120)
            (want,) = offline(folder, prompt="a red fox", height=size[0], width=size[1], seed=1, num_inference_steps=6)
            assert _pixels(got.pngs[0]).shape == (*size, 3)
            assert_within_one_level(got.pngs[0], want)
    finally:
        service.close()


@pytest.mark.slow
def test_pixart_sigma_by_prompt(tmp_path):
    folder = tmp_path / "pixart-sigma"
    tiny_pixart_pipeline(sigma=True).save_pretrained(folder)
    service = service_of(folder, dcfx.DeepCacheConfig(first=2, last=1, interval=2), max_batch=4, batch_sizes=(2, 4))
    try:
        rows = service.model.encode(["a fox"])[0]
        assert rows["encoder_hidden_states"].shape[1] == 300  # sigma's 300 T5 tokens
        got = service.submit(ImageRequest(prompt="a fox", seed=2, steps=6)).result(timeout=120)
        config = dcfx.DeepCacheConfig(first=2, last=1, interval=2)
        (want,) = offline(folder, config, prompt="a fox", seed=2, num_inference_steps=6)
        assert_within_one_level(got.pngs[0], want)
    finally:
        service.close()


@pytest.mark.slow
def test_sd3_by_prompt_two_clip_encoders_and_t5_zeros(tmp_path):
    folder = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    service = service_of(folder, dcfx.DeepCacheConfig(first=1, last=1, interval=3), max_batch=4, batch_sizes=(2, 4))
    try:
        rows = service.model.encode(["a fox"])[0]
        assert rows["encoder_hidden_states"].shape[1:] == (77 + 256, 32) and rows["pooled_projections"].shape == (1, 16)
        config = dcfx.DeepCacheConfig(first=1, last=1, interval=3)
        for request, call in [
            (ImageRequest(prompt="a red fox", seed=4, steps=7), {}),
            (
                ImageRequest(prompt="a red fox", negative_prompt="blurry", size=(16, 24), seed=4, steps=7),
                {"negative_prompt": "blurry", "height": 16, "width": 24},
            ),
        ]:
            got = service.submit(request).result(timeout=120)
            (want,) = offline(folder, config, prompt="a red fox", seed=4, num_inference_steps=7, **call)
            assert_within_one_level(got.pngs[0], want)
            assert (got.generation.full_steps, got.generation.shallow_steps) == (3, 4)
        # A schedule the pipeline shifts by the image size is refused by name, before any work.
        service.model.scheduler_config["use_dynamic_shifting"] = True
        with pytest.raises(ValueError, match="use_dynamic_shifting"):
            service.submit(ImageRequest(prompt="a red fox", seed=4, steps=7))
    finally:
        service.close()


def test_what_dcfx_serve_loads_for_a_transformer_pipeline(folder, tmp_path):
    assert isinstance(load_served(str(folder)), TransformerPipelineServeModel)
    # The same pipeline without its text encoder: its transformer with conditioning tensors.
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    pipe.register_modules(text_encoder=None)
    pipe.save_pretrained(tmp_path / "bare")
    servable, why = prompt_servable(tmp_path / "bare")
    assert not servable and "text_encoder" in why
    served = load_served(str(tmp_path / "bare"))
    assert isinstance(served, TransformerServeModel) and not isinstance(served, TransformerPipelineServeModel)
