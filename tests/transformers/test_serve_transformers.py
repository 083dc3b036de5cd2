"""The step-batching engine on diffusion transformers: a served generation is the offline one, exactly.

Requests carry the transformer's per-image inputs; the engine batches their full and shallow
steps in cohorts keyed by image tokens (latent size) and prompt tokens, and keeps cache rows of
the residual the cached blocks add. What runs alone at a padded batch size equals the pipeline
under ``dcfx.enable`` (SD3) or the offline sampling loop over ``dcfx.compile`` (every layout).
"""

from __future__ import annotations

import pytest
import torch

import dcfx
from dcfx.models import spec_for
from dcfx.serve import Engine, EngineConfig, GenerationRequest, TransformerServeModel, load_serve_model
from dcfx.tune.workload import generate_transformer
from tests.serve.helpers import drive, random_arrivals
from tests.transformers.tiny import BUILDERS

CUT = {"first": 1, "last": 1, "interval": 3}
SCHEDULERS = {"sd3": "flow", "flux": "flow", "pixart": "dpm", "dit": "ddim"}


def conditioning(name: str, call: dict, negative: bool = False) -> dict[str, torch.Tensor]:
    """The per-image inputs of a tiny pipeline's call, as a request carries them."""
    pre = "negative_" if negative else ""
    if name == "dit":
        return {"class_labels": torch.tensor([1000 if negative else 3])}
    cond = {"encoder_hidden_states": call[f"{pre}prompt_embeds"]}
    if name in ("sd3", "flux"):
        cond["pooled_projections"] = call[f"{pre}pooled_prompt_embeds"]
    return cond


@pytest.fixture(scope="module")
def sd3():
    tiny = BUILDERS["sd3"]()
    tiny.pipe.set_progress_bar_config(disable=True)
    return tiny, TransformerServeModel(tiny.transformer, dict(tiny.pipe.scheduler.config), name="sd3")


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_a_served_generation_equals_the_pipeline_under_dcfx(sd3, guidance):
    tiny, model = sd3
    call = tiny.call
    request = GenerationRequest(
        conditioning=conditioning("sd3", call),
        negative_conditioning=conditioning("sd3", call, negative=True) if guidance > 1 else None,
        guidance=guidance,
        seed=5,
        steps=7,
        size=(16, 16),
        scheduler="flow",
    )
    got = Engine(dcfx.compile(tiny.transformer, **CUT), model).run([request])[0]
    dcfx.enable(tiny.pipe, **CUT)
    try:
        with torch.no_grad():
            want = tiny.pipe(
                **{k: call[k] for k in ("prompt_embeds", "pooled_prompt_embeds")},
                **{k: call[k] for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")},
                guidance_scale=guidance,
                latents=model.prepare(request).noise,
                num_inference_steps=7,
                output_type="latent",
            ).images
    finally:
        dcfx.disable(tiny.pipe)
    torch.testing.assert_close(got.latents, want, atol=0, rtol=0)
    assert (got.full_steps, got.shallow_steps) == (3, 4)  # steps 0, 3, 6 full under 1:3


@pytest.mark.parametrize("name", ["flux", "pixart", "dit"])
def test_a_served_folder_equals_the_offline_runtime(name, tmp_path):
    tiny = BUILDERS[name]()
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    tiny.pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    model = load_serve_model(str(tmp_path))
    assert isinstance(model, TransformerServeModel) and not model.gives_images
    scheduler = SCHEDULERS[name]
    guided = name == "dit"  # DiT guides with the null class 1000
    request = GenerationRequest(
        conditioning=conditioning(name, tiny.call),
        negative_conditioning=conditioning(name, tiny.call, negative=True) if guided else None,
        guidance=4.0 if guided else 1.0,
        seed=2,
        steps=6,
        size=(8, 8),
        scheduler=scheduler,
    )
    got = Engine(dcfx.compile(model.unet, **CUT), model).run([request])[0]
    prepared = model.prepare(request)
    offline = dcfx.compile(model.unet, **CUT, scheduler=model.scheduler(scheduler))
    if guided:  # the offline loop takes one row per image: guide by hand, as the engine and DiTPipeline do
        want = _guided_offline(offline, prepared, request.guidance, 6)
    else:
        cond = {**prepared.conditioning, **prepared.shared}
        want = generate_transformer(offline, spec_for(model.unet), offline.scheduler, prepared.noise, cond, 6)
    torch.testing.assert_close(got.latents, want, atol=0, rtol=0)
    assert got.latents.shape == spec_for(model.unet).sample_shape(model.unet, 1, 8, 8)  # Flux: packed tokens
    assert (got.full_steps, got.shallow_steps) == (2, 4)


def _guided_offline(runtime, prepared, guidance, steps):
    scheduler = runtime.scheduler
    scheduler.set_timesteps(steps)
    x = prepared.noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            rows = torch.cat([scheduler.scale_model_input(x, t)] * 2)
            out = runtime(rows, t.expand(2), **prepared.conditioning, return_dict=False)[0]
            cond, uncond = prepared.prediction(out).chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def test_cohorts_are_keyed_by_image_and_prompt_tokens(sd3):
    tiny, model = sd3
    runtime = dcfx.compile(tiny.transformer, **CUT)
    config = EngineConfig(max_batch=4, batch_sizes=(4,))
    g = torch.Generator().manual_seed(0)
    requests = [
        GenerationRequest(
            conditioning={
                "encoder_hidden_states": torch.randn(1, (7, 5)[i % 2], 32, generator=g),  # prompt tokens
                "pooled_projections": torch.randn(1, 64, generator=g),
            },
            seed=i,
            steps=(5, 8)[i % 3 % 2],
            size=(8, 8) if i < 6 else (16, 16),  # image tokens
            scheduler="flow",
        )
        for i in range(8)
    ]
    engine = Engine(runtime, model, config)
    results = drive(engine, random_arrivals(requests, seed=3, spread=6))
    for request, got in zip(requests, results, strict=True):
        alone = Engine(runtime, model, config).run([request])[0]
        torch.testing.assert_close(got.latents, alone.latents, atol=0, rtol=0)
        assert (got.full_steps, got.shallow_steps) == (alone.full_steps, alone.shallow_steps)
    keys = {(key[1], key[4][0][1]) for key in engine._cohorts}  # (sample shape, prompt shape)
    assert keys == {((4, 8, 8), (7, 32)), ((4, 8, 8), (5, 32)), ((4, 16, 16), (7, 32)), ((4, 16, 16), (5, 32))}
    stats = engine.stats()
    assert max(stats["full_rows"]) >= 2 and max(stats["shallow_rows"]) >= 2  # steps did share calls
    assert stats["completed"] == 8


def test_flux_token_positions_follow_the_size_and_split_cohorts():
    tiny = BUILDERS["flux"]()
    model = TransformerServeModel(tiny.transformer, dict(tiny.pipe.scheduler.config), name="flux")
    cond = conditioning("flux", tiny.call)
    small = model.prepare(GenerationRequest(conditioning=cond, size=(8, 8), scheduler="flow"))
    large = model.prepare(GenerationRequest(conditioning=cond, size=(8, 12), scheduler="flow"))
    assert small.noise.shape == (1, 16, 16) and large.noise.shape == (1, 24, 16)  # 2x2 latent patches
    assert small.shared["img_ids"][-1].tolist() == [0.0, 3.0, 3.0] and large.shared["img_ids"][-1].tolist() == [
        0.0,
        3.0,
        5.0,
    ]
    assert small.shared["txt_ids"].shape == (7, 3) and small.shared_key() != large.shared_key()
    again = model.prepare(GenerationRequest(conditioning=cond, size=(8, 8), seed=9, scheduler="flow"))
    assert again.shared_key() == small.shared_key()


@pytest.mark.parametrize(
    ("name", "fields", "match"),
    [
        ("flux", {"conditioning": {"img_ids": torch.zeros(1, 16, 3)}}, r"takes no input 'img_ids'; conditioning in"),
        ("pixart", {"conditioning": {"encoder_hidden_states": torch.zeros(1, 4, 32)}, "size": 7}, "multiples of"),
        ("dit", {"labels": (1,)}, "takes conditioning tensors, not labels"),
    ],
)
def test_bad_requests_name_what_is_wrong(name, fields, match):
    tiny = BUILDERS[name]()
    model = TransformerServeModel(tiny.transformer, dict(tiny.pipe.scheduler.config), name=name)
    with pytest.raises(ValueError, match=match):
        model.prepare(GenerationRequest(**fields))


def test_a_unet_is_no_transformer():
    from tests.fixtures import tiny_sd

    with pytest.raises(TypeError, match="is not a diffusion transformer: serve it with UNetServeModel"):
        TransformerServeModel(tiny_sd(), {}, name="unet")


def test_a_schedule_shifted_by_image_size_is_refused_before_any_work():
    # Flux's own scheduler config (use_dynamic_shifting): its pipeline shifts the schedule by the
    # image's token count, which the engine does not; a request for it is refused by name.
    tiny = BUILDERS["flux"]()
    config = {k: v for k, v in tiny.pipe.scheduler.config.items() if not k.startswith("_")}  # as a folder's
    config["use_dynamic_shifting"] = True
    model = TransformerServeModel(tiny.transformer, config, name="flux")
    engine = Engine(dcfx.compile(model.unet, **CUT), model)
    cond = {"encoder_hidden_states": torch.zeros(1, 7, 32), "pooled_projections": torch.zeros(1, 32)}
    with pytest.raises(ValueError, match=r"scheduler 'flow' \(FlowMatchEulerDiscreteScheduler\).*use_dynamic_shifting"):
        engine.submit(GenerationRequest(conditioning=cond, size=(8, 8), scheduler="flow"))
    assert engine.stats()["submitted"] == 0
    model.scheduler_config["use_dynamic_shifting"] = False  # the same model without the shift serves
    result = engine.run([GenerationRequest(conditioning=cond, size=(8, 8), steps=3, scheduler="flow")])[0]
    assert result.latents.isfinite().all()
