"""Transformer deployment: exports of SD3, Flux, PixArt, DiT, Sana and Wan loaded by dcfx.load, and ranges of sizes.

An export cut at a block range (first=/last=) loads into the same runtime as dcfx.enable's and
gives the same latents in the model's own pipeline; one graph pair serves two resolutions and
two prompt lengths (Wan's: also several frame counts); video U-Nets are refused by name. Every
export takes 20-60 s (the ONNX exporter, or Inductor), so those tests are in the slow tier;
ranges in process, the stored spec and the refusals are fast.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import dcfx
from dcfx.export.axes import resize_call, trace_call
from dcfx.export.loaded import ExportedModel
from dcfx.export.manifest import GraphEntry, Manifest, config_sha256, read_manifest
from dcfx.export.program import build_ranged_pair
from dcfx.export.shapes import DimRange, TensorSpec
from dcfx.export.trt_plan import build_plan, profile_shapes
from dcfx.models import StoredSpec, spec_for
from tests.fixtures import tiny_unet
from tests.transformers.tiny import BUILDERS, Tiny

IMAGE_MODELS = ("sd3", "flux", "pixart", "dit", "sana")
CUT = {"first": 1, "last": 1, "interval": 2}
STEPS = 6
RTOL = 1e-4  # relative to the latents' scale (random-weight PixArt's reach the hundreds)
# Batch, latent height and width, prompt length around the pipelines' calls (batch 2 with
# guidance, 16x16 latents, 7 tokens). DiT squares its token count back into a side: static sides.
SHAPES = {
    "sd3": {"batch": (1, 2, 4), "height": (8, 24), "width": (8, 24), "tokens": (3, 7, 21)},
    "flux": {"batch": (1, 2), "height": (8, 24), "width": (8, 24), "tokens": (3, 7, 21)},
    "pixart": {"batch": (1, 2, 4), "height": (8, 24), "width": (8, 24), "tokens": (3, 7, 21)},
    "dit": {"batch": (2, 4, 8), "height": 8, "width": 8},
    "sana": {"batch": (1, 2, 4), "height": (4, 12), "width": (4, 12), "tokens": (3, 6, 21)},  # 4x4 latents
}
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def tiny(name: str) -> Tiny:
    t = BUILDERS[name]()
    t.pipe.set_progress_bar_config(disable=True)
    return t


def recorded_call(t: Tiny) -> dict:
    """The first transformer call of a plain two-step generation, as the pipeline makes it."""
    return t.recorded_call()


def prompt(t: Tiny, tokens: int, seed: int = 1) -> dict:
    """The generation's keyword arguments with prompt embeddings of ``tokens`` tokens (masks all ones)."""
    g = torch.Generator().manual_seed(seed)
    call = dict(t.call)
    for key, value in t.call.items():
        if isinstance(value, torch.Tensor) and value.ndim == 3:
            call[key] = torch.randn(value.shape[0], tokens, value.shape[2], generator=g)
        elif isinstance(value, torch.Tensor) and key.endswith("attention_mask"):
            call[key] = torch.ones(value.shape[0], tokens, dtype=value.dtype)
    return call


def generate(t: Tiny, call: dict, steps: int = STEPS, seed: int = 3, output: str = "images") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = t.pipe(**call, num_inference_steps=steps, generator=generator, output_type="latent")
    return torch.as_tensor(getattr(out, output))


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.abs().max()))


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Returns ``export(name, format)``: the tiny model's export over SHAPES, made once per session."""
    made: dict = {}

    def export(name: str, format: str = "onnx"):  # noqa: A002
        if (name, format) not in made:
            t = tiny(name)
            out = tmp_path_factory.mktemp(f"{name}-{format}") / "export"
            made[name, format] = dcfx.export(
                t.transformer, out, format=format, shapes=SHAPES[name], example=recorded_call(t), progress=False, **CUT
            )
        return made[name, format]

    return export


# ---------------------------------------------------------------- exports in pipelines (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_onnx_export_in_the_pipeline_equals_the_eager_runtime(exports, name):
    directory = exports(name)
    reference = tiny(name)
    dcfx.enable(reference.pipe, **CUT)
    want = reference.generate(STEPS, seed=3)

    t = tiny(name)
    t.pipe.transformer = dcfx.load(directory, scheduler=t.pipe.scheduler)
    got = t.generate(STEPS, seed=3)
    assert t.pipe.transformer.stats == reference.pipe.transformer.stats == {"full": 3, "shallow": 3}
    assert_close(got, want)
    assert torch.equal(t.generate(STEPS, seed=3), got)  # a second generation starts clean

    manifest = read_manifest(directory)
    blocks = spec_for(reference.pipe.transformer.model).blocks(reference.pipe.transformer.model)
    assert manifest.deepcache["first"] == 1 and manifest.deepcache["last"] == 1 and "branch" not in manifest.deepcache
    assert manifest.model["cut"] == "F1B1" and manifest.model["cached_blocks"] == list(blocks[1:-1])
    assert "branch_layer" not in manifest.model
    assert manifest.model["output"] == "diffusers.models.modeling_outputs:Transformer2DModelOutput"
    assert max(v for k, v in manifest.checks.items() if k.endswith("_max_abs_diff")) < 1e-4
    if name == "flux":  # packed tokens: the image tokens are one dimension, positions unbatched
        assert set(manifest.dims) == {"batch", "image_tokens", "tokens"}
        assert manifest.model["timestep_divisor"] == 1000.0
        assert manifest.model["unbatched"] == ["img_ids", "txt_ids"]
        assert manifest.graphs["full"].outputs[1].shape == ("batch", "image_tokens + tokens", 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_onnx_export_serves_two_resolutions_and_two_prompt_lengths(exports, name):
    loaded = dcfx.load(exports(name))
    for (height, width), tokens in [((16, 16), 7), ((24, 8), 13)]:
        call = {**prompt(tiny(name), tokens), "height": height, "width": width}
        reference = tiny(name)
        dcfx.enable(reference.pipe, **CUT)
        want = generate(reference, call)
        t = tiny(name)
        t.pipe.transformer = loaded
        loaded.scheduler = t.pipe.scheduler
        assert_close(generate(t, call), want)
    # One loaded pair served both: it is the graphs of any call inside the ranges.
    pairs = {id(p) for p in loaded._rt.graphs.pairs.values()}
    assert len(pairs) == 1 and len(loaded._rt.graphs.pairs) == 2


@pytest.mark.slow
def test_aoti_export_equals_the_eager_runtime(exports):
    directory = exports("sd3", "aoti")
    reference = tiny("sd3")
    dcfx.enable(reference.pipe, **CUT, forecast="linear")
    t = tiny("sd3")
    t.pipe.transformer = dcfx.load(directory, scheduler=t.pipe.scheduler, forecast="linear")
    for tokens, (height, width) in [(7, (16, 16)), (13, (24, 8))]:
        call = {**prompt(t, tokens), "height": height, "width": width}
        assert_close(generate(t, call), generate(reference, call))
    assert t.pipe.transformer.stats == reference.pipe.transformer.stats


@pytest.mark.slow
def test_tensorrt_plan_of_a_transformer_export(exports):
    # Engines cannot be built here; their profiles and trtexec commands can be checked.
    directory = exports("sd3")
    manifest = read_manifest(directory)
    shallow = profile_shapes(manifest.graphs["shallow"].inputs, manifest.dims)
    # The residual spans the image tokens and the text tokens: height * width + tokens (patch 1).
    assert manifest.graphs["shallow"].inputs[-1].shape == ("batch", "height*width + tokens", 32)
    assert shallow["cache_feature"] == ((1, 8 * 8 + 3, 32), (2, 24 * 24 + 7, 32), (4, 24 * 24 + 21, 32))
    assert shallow["encoder_hidden_states"] == ((1, 3, 32), (2, 7, 32), (4, 21, 32))
    plan = build_plan(manifest.graphs, manifest.dims, precision="fp16")
    assert "cache_feature:1x67x32" in plan["shallow"].trtexec()
    assert "cache_feature:1x67x32" in (directory / "trtexec.sh").read_text()


# ---------------------------------------------------------------- ranges in process (fast)


@pytest.mark.parametrize(
    "name", ["sd3", pytest.param("flux", marks=pytest.mark.slow), pytest.param("pixart", marks=pytest.mark.slow)]
)
def test_one_ranged_pair_serves_two_resolutions_and_two_prompt_lengths(name):
    ranged, static = tiny(name), tiny(name)
    dcfx.enable(ranged.pipe, **CUT, dynamic=SHAPES[name])
    dcfx.enable(static.pipe, **CUT)
    for (height, width), tokens in [((16, 16), 7), ((24, 8), 13)]:
        call = {**prompt(ranged, tokens), "height": height, "width": width}
        assert_close(generate(ranged, call, steps=4), generate(static, call, steps=4), rtol=1e-5)
    assert ranged.pipe.transformer.graph_builds == 1
    assert static.pipe.transformer.graph_builds == 2


def test_dit_takes_a_range_of_batches_not_of_sides():
    ranged, static = tiny("dit"), tiny("dit")
    dcfx.enable(ranged.pipe, **CUT, dynamic=SHAPES["dit"])
    dcfx.enable(static.pipe, **CUT)
    for labels in ([1, 3], [1, 3, 5]):  # batches 4 and 6 with guidance
        call = {**ranged.call, "class_labels": labels}
        assert_close(generate(ranged, call, steps=4), generate(static, call, steps=4), rtol=1e-5)
    assert ranged.pipe.transformer.graph_builds == 1

    # DiT squares its token count back into a side: one graph cannot serve several sides.
    sides = tiny("dit")
    dcfx.enable(sides.pipe, **CUT, dynamic={"batch": (2, 8), "height": (8, 16), "width": (8, 16)})
    with pytest.raises(ValueError, match=r"DiTTransformer2DModel could not be traced over the ranges.*DiT: square"):
        generate(sides, sides.call, steps=2)


def pixart_at_its_size() -> tuple:
    """PixArt's model, flat input names, a call at its configured height (8) and ranges around it."""
    t = tiny("pixart")
    model = t.transformer
    (names, tensors), _ = spec_for(model).flatten(model, (), recorded_call(t))
    dims = {
        "batch": DimRange("batch", 1, 2, 4),
        "height": DimRange("height", 8, 8, 16, 2),
        "width": DimRange("width", 8, 8, 24, 2),
        "tokens": DimRange("tokens", 7, 7, 7),
    }
    at = resize_call(model, names, tensors, {"batch": 2, "height": 8, "width": 18, "tokens": 7})
    return model, names, at, dims


def test_a_size_the_model_special_cases_is_refused_by_name():
    # PixArt reuses its stored position embedding at its configured size (8 latent pixels):
    # traced there, torch.export fixes the height without complaint. (trace_call keeps traces
    # off that size; here the capture is made there on purpose.)
    model, names, at, dims = pixart_at_its_size()
    fixed = r"torch\.export fixed the height of PixArtTransformer2DModel's hidden_states at 8"
    with pytest.raises(ValueError, match=fixed):
        build_ranged_pair(model, (1, 1), names, at, dims)
    traced = trace_call(model, names, at, dims)
    assert traced[0].shape[2:] == (10, 12)  # off the configured size and apart


@pytest.mark.slow  # a second ranged capture of PixArt; SD3's ranged pair serves its range fast above
def test_off_the_special_size_the_pair_serves_the_range():
    model, names, at, dims = pixart_at_its_size()
    pair = build_ranged_pair(model, (1, 1), names, trace_call(model, names, at, dims), dims)  # checks the range
    # Its layers are the model's only: the shape checks torch.export adds over ranges carry a
    # stand-in module stack (_empty_nn_module_stack_from_metadata_hook) that names no module.
    assert pair.kept_layers == [
        *("pos_embed", "adaln_single", "caption_projection"),
        *("transformer_blocks.0", "transformer_blocks.3", "norm_out", "proj_out"),
    ]


# ---------------------------------------------------------------- stored spec and refusals (fast)


def _manifest(t: Tiny, deepcache: dict) -> Manifest:
    """A manifest of ``t``'s transformer as an export writes it, with placeholder graph entries."""
    model = t.transformer
    spec = spec_for(model)
    config = json.loads(json.dumps(dict(model.config), default=str))
    described = {**spec.describe(model), "config": config, "config_sha256": config_sha256(config)}
    entry = GraphEntry("graph.bin", [TensorSpec("hidden_states", "hidden_states", "float32", ("batch", 4, 8, 8))], [])
    dims = {"batch": DimRange("batch", 1, 2, 4)}
    return Manifest("onnx", {}, described, deepcache, "float32", dims, {"full": entry, "shallow": entry})


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_the_stored_spec_calls_like_the_model(name):
    t = tiny(name)
    model = t.transformer
    spec = spec_for(model)
    manifest = _manifest(t, {"first": 1, "last": 1})
    stand_in = ExportedModel(manifest, torch.device("cpu"))
    stored = StoredSpec.from_description(ExportedModel, manifest.model)
    assert stored.sample_input == "hidden_states" and stored.sample_dims == spec.sample_dims
    assert stored.timestep_divisor == spec.timestep_divisor == (1000.0 if name == "flux" else 1.0)
    assert stored.context_width(stand_in) == spec.context_width(model)
    assert stored.output_class() is spec.output_class()
    call = recorded_call(t)
    (names, tensors), _ = spec.flatten(model, (), call)
    assert stored.flatten(stand_in, (), call)[0][0] == names
    stored.check_inputs(stand_in, names, tensors)  # Flux's token positions have no batch
    out = stored.output(tensors[0], return_dict=True)
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample is tensors[0]
    with stand_in.cache_context("cond"):  # what Flux pipelines enter around each call
        pass


def test_load_refuses_another_cut_by_name(tmp_path):
    t = tiny("sd3")
    manifest = _manifest(t, {"first": 1, "last": 1, "interval": 2})
    directory = tmp_path / "sd3"
    directory.mkdir()
    (directory / "graph.bin").write_bytes(b"never opened")
    manifest.write(directory)
    with pytest.raises(ValueError, match=r"F1B1 \(first=1, last=1\); first=2 asks for another cut"):
        dcfx.load(directory, first=2)
    with pytest.raises(ValueError, match=r"F1B1 \(first=1, last=1\); last=0 asks for another cut: export again"):
        dcfx.load(directory, last=0)
    with pytest.raises(ValueError, match=r"a diffusion transformer's graphs.*branch= cuts a U-Net"):
        dcfx.load(directory, branch=0)

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "graph.bin").write_bytes(b"never opened")
    manifest.deepcache = {"branch": 1, "interval": 2}
    manifest.write(unet)
    with pytest.raises(ValueError, match="a U-Net's graphs cut at branch 1; first= and last= cut"):
        dcfx.load(unet, first=1, last=1)
    with pytest.raises(ValueError, match="holds the graphs of branch 1; export again for branch 0"):
        dcfx.load(unet, branch=0)


def test_export_refusals_come_before_any_work(tmp_path):
    sd3 = tiny("sd3")
    with pytest.raises(ValueError, match="branch=0 cuts a U-Net"):
        dcfx.export(sd3.transformer, tmp_path / "x", branch=0, progress=False)
    with pytest.raises(ValueError, match="leave no block to cache"):
        dcfx.export(sd3.transformer, tmp_path / "x", first=2, last=2, progress=False)
    with pytest.raises(ValueError, match=r"the example's tokens 7 is outside shapes\['tokens'\]"):
        dcfx.export(sd3.transformer, tmp_path / "x", shapes={"tokens": (8, 16)}, example=recorded_call(sd3), **CUT)
    flux = tiny("flux")
    small = {"height": (2, 8), "width": (2, 8)}  # packed: 1..16 image tokens, the example has 64
    with pytest.raises(ValueError, match=r"the example's 64 image tokens are outside 1\.\.16, the counts of"):
        dcfx.export(flux.transformer, tmp_path / "x", shapes=small, example=recorded_call(flux), **CUT)
    if not HAS_TENSORRT:
        with pytest.raises(ImportError, match=r"trtexec\.sh"):
            dcfx.export(sd3.transformer, tmp_path / "trt", format="tensorrt", **CUT)
    assert not list(tmp_path.iterdir())


# Wan's latent frames (1-4) with heights, widths and prompt lengths; its pipeline calls the
# transformer at batch 1 (once per guidance branch). The calls: (pixel height, width), video
# frames, prompt tokens: latents 2x4x4 (the recorded call's), 3x6x4 and 1x4x4.
WAN_SHAPES = {"batch": (1, 2), "height": (4, 8), "width": (4, 8), "frames": (1, 2, 4), "tokens": (3, 6, 12)}
WAN_CALLS = [((32, 32), 5, 6), ((48, 32), 9, 10), ((32, 32), 1, 3)]


def wan_call(t: Tiny, size: tuple[int, int], frames: int, tokens: int) -> dict:
    return {**prompt(t, tokens), "height": size[0], "width": size[1], "num_frames": frames}


@pytest.mark.slow
def test_wan_takes_one_ranged_pair_for_frame_counts_sizes_and_prompt_lengths(tmp_path):
    # One pair over the ranges, in process (dynamic=) and exported (ONNX), against a static
    # runtime per call.
    t = tiny("wan")
    directory = dcfx.export(
        t.transformer, tmp_path / "wan", shapes=WAN_SHAPES, example=recorded_call(t), progress=False, **CUT
    )
    manifest = read_manifest(directory)
    assert manifest.dims["frames"] == DimRange("frames", 1, 2, 4)
    assert manifest.graphs["shallow"].inputs[0].shape == ("batch", 4, "frames", "height", "width")
    # The residual spans every video token: frames x (height / 2) x (width / 2) (patch 1x2x2).
    assert manifest.graphs["shallow"].inputs[-1].shape == ("batch", "frames*height*width/4", 16)
    assert "hidden_states:1x4x1x4x4" in (directory / "trtexec.sh").read_text()  # TensorRT's profile minimum

    ranged, loaded = tiny("wan"), tiny("wan")
    dcfx.enable(ranged.pipe, **CUT, dynamic=WAN_SHAPES)
    loaded.pipe.transformer = dcfx.load(directory, scheduler=loaded.pipe.scheduler)
    for size, frames, tokens in WAN_CALLS:
        call = wan_call(loaded, size, frames, tokens)
        reference = tiny("wan")
        dcfx.enable(reference.pipe, **CUT)
        want = generate(reference, call, output="frames")
        assert reference.pipe.transformer.stats == {"full": 6, "shallow": 6}  # 1:2 on both guidance calls
        assert_close(generate(ranged, call, output="frames"), want)
        before = dict(loaded.pipe.transformer.stats)
        assert_close(generate(loaded, call, output="frames"), want)
        ran = {k: v - before.get(k, 0) for k, v in loaded.pipe.transformer.stats.items()}
        assert ran == {"full": 6, "shallow": 6}
    assert ranged.pipe.transformer.graph_builds == 1
    five = wan_call(loaded, (32, 32), 17, 6)  # 5 latent frames
    with pytest.raises(ValueError, match=r"frames is 5, outside this runtime's range 1\.\.4"):
        generate(ranged, five, steps=2, output="frames")
    with pytest.raises(ValueError, match=r"'hidden_states' dim 2 \(frames\) is 5, outside the exported range 1\.\.4"):
        generate(loaded, five, steps=2, output="frames")

    # Forecasting the residual through the export's forecast graph, on a 3-frame video.
    call = wan_call(loaded, *WAN_CALLS[1])
    reference = tiny("wan")
    dcfx.enable(reference.pipe, **CUT, forecast="linear")
    loaded.pipe.transformer = dcfx.load(directory, scheduler=loaded.pipe.scheduler, forecast="linear")
    want = generate(reference, call, output="frames")
    assert_close(generate(loaded, call, output="frames"), want)
    assert (want - generate(ranged, call, output="frames")).abs().max() > 100 * RTOL, "forecast changed nothing"

    # Frames left out of dynamic= are the first call's: another count is refused by name.
    first = tiny("wan")
    dcfx.enable(first.pipe, **CUT, dynamic={k: v for k, v in WAN_SHAPES.items() if k != "frames"})
    generate(first, wan_call(first, *WAN_CALLS[0]), steps=2, output="frames")  # 2 latent frames
    with pytest.raises(ValueError, match=r"frames is 3, outside this runtime's range exactly 2"):
        generate(first, wan_call(first, *WAN_CALLS[1]), steps=2, output="frames")


def test_video_unet_export_is_refused_by_name(tmp_path):
    from tests.pipelines.builders import tiny_svd_unet

    unet = tiny_svd_unet()
    with pytest.raises(TypeError, match=r"dcfx\.export takes image U-Nets and transformers; .* is a video U-Net"):
        dcfx.export(unet, tmp_path / "x", branch=0)
    with pytest.raises(TypeError, match="dynamic= takes image U-Nets and transformers"):
        dcfx.compile(unet, dynamic=True, branch=0)
    assert not list(tmp_path.iterdir())


def test_a_unet_export_still_records_its_branch_layer():
    # The U-Net side of the manifest's cut entry, without an export (the writer's helper).
    from dcfx.export.writer import _cut

    assert _cut(tiny_unet(layers_per_block=1), dcfx.DeepCacheConfig(branch=1)) == {
        "branch_layer": "up_blocks.1.resnets.0"
    }
    assert _cut(tiny("flux").transformer, dcfx.DeepCacheConfig(first=1, last=1)) == {
        "cut": "F1B1",
        "cached_blocks": ["transformer_blocks.1", "single_transformer_blocks.0"],
    }
