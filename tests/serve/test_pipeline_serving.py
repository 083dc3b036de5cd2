"""A pipeline served by prompt, in-process: text encoder, engine and VAE stages against the offline pipeline.

One saved tiny SD pipeline folder (a real CLIP tokenizer and text encoder built here) per
module: the server loads it as a user's folder, the offline reference is the same folder loaded
by diffusers with the same dcfx config, seed, prompt and settings.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

import dcfx
from dcfx.serve.engine import Engine, EngineConfig
from dcfx.serve.images import ImageRequest, parse_images_request, response_body
from dcfx.serve.pipeline import PipelineServeModel, load_pipeline, load_served, prompt_servable
from dcfx.serve.service import PipelineService
from tests.serve.helpers import held
from tests.serve.pipelines import save_tiny_sd_pipeline, tiny_sdxl_pipeline

CONFIG = dcfx.DeepCacheConfig(branch=0, interval=3)


# PNDM (SD 1.5's own scheduler; its PLMS start repeats a timestep) in the slow tier.
@pytest.fixture(scope="module", params=["ddim", pytest.param("pndm", marks=pytest.mark.slow)])
def folder(request, tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp(request.param) / "sd", request.param)


_OFFLINE: dict = {}


def offline(folder, config=CONFIG, **call) -> list[bytes]:
    """The pipeline itself, loaded from the folder once per config (then reused, as a user reuses
    a pipeline), with dcfx enabled: PNG bytes of each image."""
    key = (str(folder), repr(config))
    if key not in _OFFLINE:
        if (folder / "text_encoder_2").is_dir():
            pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _OFFLINE[key] = dcfx.enable(pipe, config)
    pipe = _OFFLINE[key]
    seed = call.pop("seed")
    images = pipe(**call, generator=torch.Generator().manual_seed(seed)).images
    return [_png(image) for image in images]


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def assert_within_one_level(served: bytes, expected: bytes) -> None:
    """Equal images, or a few pixels one level apart: the kernels' rounding by batch size and row order."""
    a, b = _pixels(served), _pixels(expected)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def service_of(folder, config=CONFIG, choices=(), **engine) -> PipelineService:
    model = load_pipeline(folder)
    runtime = dcfx.compile(model.unet, config)
    return PipelineService(model, Engine(runtime, model, EngineConfig(**engine), choices=choices))


@pytest.mark.slow  # 16 s; the fast tier serves SD by prompt in test_progress_per_step_and_bad_requests_...
def test_served_images_equal_the_offline_pipeline_then_concurrent_requests_share_stage_calls(folder):
    service = service_of(folder, max_batch=8, batch_sizes=(2, 4, 8))
    try:
        # Alone, at the offline batch size (2 rows: guided): the PNG bytes are the pipeline's.
        alone = service.submit(ImageRequest(prompt="a red fox", seed=3, steps=10)).result(timeout=120)
        assert alone.pngs == offline(folder, prompt="a red fox", seed=3, num_inference_steps=10)
        assert alone.generation.full_steps >= 4 and alone.generation.shallow_steps >= 6  # DeepCache ran
        # n images and a negative prompt: the pipeline's num_images_per_prompt from one seed.
        two = service.submit(ImageRequest(prompt="a red fox", negative_prompt="blurry", n=2, seed=5, steps=10)).result(
            timeout=120
        )
        reference = offline(
            folder,
            prompt="a red fox",
            negative_prompt="blurry",
            num_images_per_prompt=2,
            seed=5,
            num_inference_steps=10,
        )
        assert len(two.pngs) == 2 and two.pngs[0] != two.pngs[1]
        for served, expected in zip(two.pngs, reference, strict=True):
            assert_within_one_level(served, expected)

        # Three requests at once, the same pipeline objects after the first generations: the text
        # encoder and the VAE take what waits together; each image stays its offline image
        # (within one level of a pixel where the batch size changed the kernels).
        calls_before = service.stats()["text_encoder_calls"]
        prompts = ["a red fox", "a blue car", "a green tree"]
        with held(service.encoder, ["hold"]):  # the encoder busy while the three arrive
            futures = [service.submit(ImageRequest(prompt=p, seed=i, steps=10)) for i, p in enumerate(prompts)]
        results = [f.result(timeout=120) for f in futures]
        stats = service.stats()
        assert stats["text_encoder_calls"] - calls_before <= 2  # the held call, then all three together
        assert max(stats["text_encoder_items_per_call"]) >= 3  # the three requests in one call
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            (expected,) = offline(folder, prompt=prompt, seed=i, num_inference_steps=10)
            assert_within_one_level(result.pngs[0], expected)
    finally:
        service.close()


@pytest.mark.slow
def test_per_request_settings_share_one_graph_pair_and_equal_their_offline_config(folder):
    forecasting = dcfx.DeepCacheConfig(branch=0, interval=3, forecast="linear")
    choices = [CONFIG, dcfx.DeepCacheConfig(branch=0, interval=5), forecasting]
    service = service_of(folder, forecasting, choices=choices, max_batch=4, batch_sizes=(2, 4))
    try:
        assert service.engine.choices()[0] == (3, "none")  # the first choice is the default
        default = service.submit(ImageRequest(prompt="a cat", seed=1, steps=10)).result(timeout=120)
        five = service.submit(ImageRequest(prompt="a cat", seed=1, steps=10, interval=5)).result(timeout=120)
        linear = service.submit(ImageRequest(prompt="a cat", seed=1, steps=10, forecast="linear")).result(timeout=120)
        assert default.pngs == offline(folder, prompt="a cat", seed=1, num_inference_steps=10)
        config5 = dcfx.DeepCacheConfig(branch=0, interval=5)
        assert five.pngs == offline(folder, config5, prompt="a cat", seed=1, num_inference_steps=10)
        assert linear.pngs == offline(folder, forecasting, prompt="a cat", seed=1, num_inference_steps=10)
        assert len({default.pngs[0], five.pngs[0], linear.pngs[0]}) == 3
        assert five.generation.full_steps < default.generation.full_steps
        with pytest.raises(ValueError, match="does not offer interval 4"):
            service.submit(ImageRequest(prompt="a cat", interval=4))
    finally:
        service.close()


def test_progress_per_step_and_bad_requests_refused_before_any_work(folder):
    service = service_of(folder, max_batch=4, batch_sizes=(2, 4))
    try:
        service.warmup()  # what a replica does before it takes requests: every batch size built
        built = service.engine.runtime.graph_builds
        assert built == 2
        steps: list[tuple[int, int, bool]] = []
        result = service.submit(
            ImageRequest(prompt="a red fox", seed=3, steps=7), on_step=lambda *a: steps.append(a)
        ).result(timeout=120)
        total = result.generation.full_steps + result.generation.shallow_steps
        assert [s for s, _, _ in steps] == list(range(1, total + 1)) and {t for _, t, _ in steps} == {total}
        assert sum(full for _, _, full in steps) == result.generation.full_steps
        assert steps[0][2] is True  # a generation starts with a full step
        before = service.stats()
        for bad, match in [
            (ImageRequest(prompt="x", size=(30, 32)), "multiples of 8"),
            (ImageRequest(prompt="x", scheduler="plms"), "unknown scheduler 'plms'"),
            (ImageRequest(prompt="x", n=3, guidance=7.5), "more than max_batch 4"),
            (ImageRequest(prompt="x", forecast="linear"), "does not offer"),
        ]:
            with pytest.raises(ValueError, match=match):
                service.submit(bad)
        after = service.stats()
        assert after["submitted"] == before["submitted"] and after["text_encoder_items"] == before["text_encoder_items"]
        # The engine took no part of them, and still serves.
        again = service.submit(ImageRequest(prompt="a red fox", seed=3, steps=7)).result(timeout=120)
        assert again.pngs == result.pngs
        assert service.engine.runtime.graph_builds == built  # served without a capture
        assert result.pngs == offline(folder, prompt="a red fox", seed=3, num_inference_steps=7)  # the pipeline's PNG
    finally:
        service.close()


@pytest.mark.slow
def test_sdxl_by_prompt_pooled_embeddings_size_ids_and_zero_negative(tmp_path):
    folder = tmp_path / "sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    service = service_of(folder, max_batch=4, batch_sizes=(2, 4))
    try:
        assert service.texts(ImageRequest(prompt="a fox")) == ["a fox"]  # force_zeros_for_empty_prompt
        request = ImageRequest(prompt="a red fox", seed=3, steps=8)  # one text: the encoders' batch is the pipeline's
        assert service.submit(request).result(timeout=120).pngs == offline(
            folder, prompt="a red fox", seed=3, num_inference_steps=8
        )
        # With a negative prompt both texts are encoded in one call, the pipeline encodes them one
        # by one: at one torch thread that moves one pixel by one level (measured).
        request = ImageRequest(prompt="a red fox", negative_prompt="blurry", seed=3, steps=8)
        served = service.submit(request).result(timeout=120)
        expected = offline(folder, prompt="a red fox", negative_prompt="blurry", seed=3, num_inference_steps=8)
        assert_within_one_level(served.pngs[0], expected[0])
        wide = service.submit(ImageRequest(prompt="a red fox", size=(32, 48), seed=3, steps=4)).result(timeout=120)
        reference = offline(folder, prompt="a red fox", height=32, width=48, seed=3, num_inference_steps=4)
        assert _pixels(wide.pngs[0]).shape == (32, 48, 3)
        assert_within_one_level(wide.pngs[0], reference[0])  # the time ids of this size reached the U-Net
    finally:
        service.close()


def test_images_api_bodies():
    request = parse_images_request(
        {"prompt": "a fox", "n": 2, "size": "48x32", "response_format": "b64_json", "model": "sd", "user": "u1"},
        model="/models/sd",
    )
    assert request.size == (32, 48) and request.n == 2 and request.scheduler == "pipeline"
    assert 0 <= request.seed < 2**31  # drawn when not given; the answer reports it
    for body, match in [
        ({}, "prompt is required"),
        ({"prompt": ""}, "non-empty"),
        ({"prompt": "a", "size": "512"}, "WIDTHxHEIGHT"),
        ({"prompt": "a", "response_format": "url"}, "b64_json"),
        ({"prompt": "a", "quality": "hd"}, "unknown request key"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "guidance": 0.5}, "guidance"),
        ({"prompt": "a", "model": "dall-e-3"}, "serves the model"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            parse_images_request(body, model="/models/sd")
    body = response_body([b"\x89PNG"], {"seed": 1}, created=7)
    assert body == {"created": 7, "data": [{"b64_json": "iVBORw=="}], "dcfx": {"seed": 1}}


def test_what_dcfx_serve_loads(tmp_path):
    folder = save_tiny_sd_pipeline(tmp_path / "sd")
    assert isinstance(load_served(str(folder)), PipelineServeModel)
    # The same pipeline without its text encoder: its U-Net with conditioning tensors, as before.
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.text_encoder = None
    pipe.register_modules(text_encoder=None)
    pipe.save_pretrained(tmp_path / "bare")
    servable, why = prompt_servable(tmp_path / "bare")
    assert not servable and "text_encoder" in why
    served = load_served(str(tmp_path / "bare"))
    assert not isinstance(served, PipelineServeModel) and served.unet.config.cross_attention_dim == 8
