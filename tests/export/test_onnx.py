"""ONNX export: onnxruntime runs both graphs like the eager runtime, from one dynamic export."""

from __future__ import annotations

import copy
import json
import pickle

import onnx
import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx.export.manifest import read_manifest
from tests.export.conftest import SD_BRANCH, SD_SHAPES, forecast_case, sample_loop, sd_example, sd_unet
from tests.export.fresh import run_fresh
from tests.fixtures import (
    UNET_FACTORIES,
    example_call,
    make_ddim_pipeline,
    make_sd_pipeline,
    run_ddim,
    run_sd,
    tiny_ddpm,
)

ATOL = 1e-4


def calls(unet, batch, height, width, ts=(900, 800, 700, 600, 500), tokens=7):
    g = torch.Generator().manual_seed(batch * 1000 + height + width)
    x = torch.randn(batch, 4, height, width, generator=g)
    ehs = torch.randn(batch, tokens, 8, generator=g)
    return [unet(x, t, encoder_hidden_states=ehs).sample for t in ts]


@pytest.mark.parametrize(
    ("batch", "height", "width", "tokens"),
    [(1, 8, 8, 7), (2, 16, 24, 3), (4, 32, 32, 21), (3, 24, 8, 14)],
)
@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_matches_eager_runtime_at_several_sizes(onnx_sd, batch, height, width, tokens):
    loaded = dcfx.load(onnx_sd)
    eager = dcfx.compile(sd_unet(), branch=SD_BRANCH, interval=3)
    got, want = calls(loaded, batch, height, width, tokens=tokens), calls(eager, batch, height, width, tokens=tokens)
    assert loaded.stats == eager.stats == {"full": 2, "shallow": 3}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_pipeline_schedule_equals_eager_runtime(onnx_sd):
    # Every U-Net call of a 10-step pipeline run with the eager runtime, replayed on the export.
    reference = make_sd_pipeline(sd_unet())
    reference.unet = dcfx.compile(reference.unet, branch=SD_BRANCH, interval=3, scheduler=reference.scheduler)
    record = []
    reference.unet.register_forward_hook(
        lambda m, args, kwargs, out: record.append((args, kwargs, out[0].clone())), with_kwargs=True
    )
    want = run_sd(reference, steps=10, size=32)
    replay = dcfx.load(onnx_sd)
    for args, kwargs, out in record:
        torch.testing.assert_close(replay(*args, **kwargs)[0], out, atol=ATOL, rtol=0)
    assert replay.stats == reference.unet.stats == {"full": 4, "shallow": 6}

    # The export in the pipeline itself. Guidance (7.5) amplifies the per-call differences
    # (~1e-6) step by step, so the latents agree to 1e-3, not 1e-4.
    pipe = make_sd_pipeline(sd_unet())
    pipe.unet = dcfx.load(onnx_sd, scheduler=pipe.scheduler)
    got = run_sd(pipe, steps=10, size=32)
    assert pipe.unet.stats == {"full": 4, "shallow": 6}
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    # Two generations in a row: the second equals the first (no state leaks between them).
    torch.testing.assert_close(run_sd(pipe, steps=10, size=32), got, atol=0, rtol=0)


@pytest.mark.parametrize(("batch", "height", "width"), [(2, 16, 16), (1, 24, 8)])
@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_forecast_sampling_loop_equals_eager_runtime(onnx_sd, batch, height, width):
    x, call = forecast_case(batch, height, width)
    scheduler = DDIMScheduler()
    eager = dcfx.compile(sd_unet(), branch=SD_BRANCH, interval=3, forecast="linear", scheduler=scheduler)
    want = sample_loop(eager, scheduler, call, x)
    loaded = dcfx.load(onnx_sd, forecast="linear", scheduler=scheduler)
    got = sample_loop(loaded, scheduler, call, x)
    assert loaded.stats == eager.stats == {"full": 4, "shallow": 6}
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Turned on after load: the forecast graph is opened at the next build, and gives the same.
    later = dcfx.load(onnx_sd, scheduler=scheduler)
    reuse = sample_loop(later, scheduler, call, x)
    assert later.deepcache_config.forecast == "none" and later._rt.graphs.pairs
    assert (got - reuse).abs().max() > 100 * ATOL, "forecasting changed nothing: the test would be vacuous"
    again = sample_loop(later.reschedule(forecast="linear"), scheduler, call, x)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_load_changes_the_schedule_not_the_branch(onnx_sd):
    loaded = dcfx.load(onnx_sd, interval=2)
    assert loaded.deepcache_config.interval == 2 and loaded.deepcache_config.branch == SD_BRANCH
    calls(loaded, 2, 16, 16, ts=(900, 800, 700, 600))
    assert loaded.stats == {"full": 2, "shallow": 2}
    with pytest.raises(ValueError, match=f"holds the graphs of branch {SD_BRANCH}"):
        dcfx.load(onnx_sd, branch=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['cuda_graph'\].*onnx: providers, session_options"):
        dcfx.load(onnx_sd, cuda_graph=True)


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_loaded_runtime_has_no_original_to_restore_or_save(onnx_sd, tmp_path):
    pipe = make_sd_pipeline(sd_unet())
    pipe.unet = dcfx.load(onnx_sd, scheduler=pipe.scheduler)
    assert pipe.unet.config.cross_attention_dim == 8 and pipe.unet.dtype == torch.float32
    with pytest.raises(TypeError, match="no original U-Net to restore"):
        dcfx.disable(pipe)
    # Saving the pipeline refuses, rather than writing it without its U-Net.
    with pytest.raises(TypeError, match=r"loaded from a dcfx export \(dcfx.load\).*its original U-Net"):
        pipe.save_pretrained(tmp_path / "pipe")


def test_example_outside_the_shapes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"example's height 40 is outside shapes\['height'\] \(8..32"):
        dcfx.export(sd_unet(), tmp_path / "x", shapes=SD_SHAPES, example=sd_example(size=40), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("graph", ["shallow", "forecast"])
@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_shallow_weights_are_stored_once(onnx_sd, graph):
    manifest = read_manifest(onnx_sd)
    sizes = manifest.format_data["weights"]
    assert sizes[f"{graph}_new_bytes"] == 0 < sizes[f"{graph}_weight_bytes"] < sizes["full_weight_bytes"]
    assert sizes["forecast_weight_bytes"] == sizes["shallow_weight_bytes"]
    assert sizes["file_bytes"] >= sizes["full_weight_bytes"]
    assert manifest.files["weights.bin"]["bytes"] == sizes["file_bytes"]
    model = onnx.load(str(onnx_sd / f"{graph}.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"weights.bin"}
    for name in ("full.onnx", f"{graph}.onnx"):
        onnx.checker.check_model(str(onnx_sd / name))
        assert (onnx_sd / name).stat().st_size < 5e6  # graphs only; the weights live in weights.bin


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_graph_io_carries_the_dimension_names(onnx_sd):
    model = onnx.load(str(onnx_sd / "shallow.onnx"), load_external_data=False)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert shapes["sample"] == ["batch", 4, "height", "width"]
    assert shapes["encoder_hidden_states"] == ["batch", "tokens", 8]
    assert shapes["cache_feature"][0] == "batch" and shapes["cache_feature"][2:] == ["height", "width"]
    forecast = onnx.load(str(onnx_sd / "forecast.onnx"), load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in forecast.graph.input}
    assert list(inputs)[-3:] == ["cache_feature", "cache_previous", "forecast_coefficient"]
    assert inputs["cache_previous"] == inputs["cache_feature"] == shapes["cache_feature"]
    assert inputs["forecast_coefficient"] == []
    manifest = json.loads((onnx_sd / "manifest.json").read_text())
    assert manifest["dims"]["batch"] == {"min": 1, "opt": 2, "max": 4, "multiple": 1}
    checks = manifest["checks"]
    assert max(checks[f"{g}_max_abs_diff"] for g in ("full", "shallow", "forecast")) < ATOL
    assert checks["forecast_moved_max_abs"] > 100 * ATOL  # the check's forecast differs from the shallow output
    assert manifest["model"]["class"] == "UNet2DConditionModel" and manifest["deepcache"]["branch"] == SD_BRANCH


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_trtexec_script_covers_the_ranges(onnx_sd):
    script = (onnx_sd / "trtexec.sh").read_text()
    fp16 = [line for line in script.splitlines() if line.startswith("trtexec")]
    assert len(fp16) == 3 and all("--fp16" in line for line in fp16)
    full = next(line for line in fp16 if "--onnx=full.onnx" in line)
    assert "--minShapes=sample:1x4x8x8,timestep:1,encoder_hidden_states:1x3x8" in full
    assert "--maxShapes=sample:4x4x32x32,timestep:4,encoder_hidden_states:4x21x8" in full
    shallow = next(line for line in fp16 if "--onnx=shallow.onnx" in line)
    assert "cache_feature:2x16x16x16" in shallow  # opt: batch 2, 16x16, 16 channels at branch 1
    forecast = next(line for line in fp16 if "--onnx=forecast.onnx" in line)
    assert "--saveEngine=forecast.plan" in forecast
    assert "cache_feature:4x16x32x32,cache_previous:4x16x32x32 " in forecast  # the 0-d coefficient takes no shape
    assert "forecast_coefficient" not in forecast


@pytest.mark.parametrize(("batch", "height", "match"), [(2, 40, r"\(height\) is 40"), (2, 15, "15")])
@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_inputs_outside_the_export_are_refused(onnx_sd, batch, height, match):
    loaded = dcfx.load(onnx_sd)
    with pytest.raises(ValueError, match=match):
        loaded(torch.randn(batch, 4, height, 16), 900, encoder_hidden_states=torch.randn(batch, 7, 8))
    with pytest.raises(ValueError, match="exported with"):
        loaded(torch.randn(2, 4, 16, 16), 900, torch.randn(2, 7, 8), class_labels=torch.zeros(2))
    assert loaded.stats == {"full": 0, "shallow": 0}


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_runs_in_a_fresh_process_without_diffusers(onnx_sd, tmp_path):
    g = torch.Generator().manual_seed(3)
    x, ehs = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 7, 8, generator=g)
    outs, stdout = run_fresh(onnx_sd, tmp_path, x, ehs)
    assert stdout.split() == ["ModelOutput", "1", "2"]  # dcfx's own output class: no diffusers there
    eager = dcfx.compile(sd_unet(), branch=SD_BRANCH, interval=3)
    for got, t in zip(outs, (900, 800, 700), strict=True):
        torch.testing.assert_close(got, eager(x, t, encoder_hidden_states=ehs).sample, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_unet2d_model_in_a_ddim_pipeline(tmp_path):
    unet = tiny_ddpm()
    out = dcfx.export(
        unet,
        tmp_path / "ddpm",
        branch=2,
        interval=3,
        shapes={"batch": (1, 2), "height": 16, "width": 16},
        progress=False,
    )
    reference = make_ddim_pipeline(tiny_ddpm())
    reference.unet = dcfx.compile(reference.unet, branch=2, interval=3, scheduler=reference.scheduler)
    pipe = make_ddim_pipeline(tiny_ddpm())
    pipe.unet = dcfx.load(out, scheduler=pipe.scheduler)
    torch.testing.assert_close(run_ddim(pipe), run_ddim(reference), atol=ATOL, rtol=0)
    assert pipe.unet.stats == reference.unet.stats == {"full": 4, "shallow": 6}
    assert read_manifest(out).model["class"] == "UNet2DModel"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sdxl", "ddpm-class"])
def test_other_inputs_enter_the_export(tmp_path, layout):
    # SDXL's added_cond_kwargs (a dict of tensors) and class labels (int64) are graph inputs too.
    make = UNET_FACTORIES[layout]
    call = example_call(make(), batch=2, size=16)
    out = dcfx.export(
        make(),
        tmp_path / layout,
        branch=1,
        interval=2,
        shapes={"batch": 2, "height": 16, "width": 16},
        example=call,
        progress=False,
    )
    loaded, eager = dcfx.load(out), dcfx.compile(make(), branch=1, interval=2)
    for t in (900, 800, 700):
        torch.testing.assert_close(
            loaded(**{**call, "timestep": t})[0], eager(**{**call, "timestep": t})[0], atol=ATOL, rtol=0
        )
    assert loaded.stats == {"full": 2, "shallow": 1}
    names = [s.name for s in read_manifest(out).graphs["full"].inputs]
    if layout == "sdxl":
        assert names[-2:] == ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"]
        assert loaded.add_embedding.linear_1.in_features == make().add_embedding.linear_1.in_features
    else:
        assert "class_labels" in names


@pytest.mark.parametrize("batch", [5, 9])
@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_a_batch_above_the_range_runs_in_chunks(onnx_sd, batch):
    # The export takes batches 1..4: 5 runs as 3 + 2 rows, 9 as 3 + 3 + 3, each chunk writing
    # its rows of the outputs and of the cache buffer; forecasting reads both buffers in chunks.
    loaded = dcfx.load(onnx_sd, interval=3, forecast="linear", scheduler=DDIMScheduler())
    eager = dcfx.compile(sd_unet(), branch=SD_BRANCH, interval=3, forecast="linear", scheduler=DDIMScheduler())
    x, call = forecast_case(batch=batch)
    got = sample_loop(loaded, loaded.scheduler, call, x, steps=8)
    want = sample_loop(eager, eager.scheduler, call, x, steps=8)
    assert loaded.stats == eager.stats == {"full": 3, "shallow": 5}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert loaded._state().cache.shape[0] == batch


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_a_loaded_export_refuses_to_be_pickled_or_copied(onnx_sd):
    loaded = dcfx.load(onnx_sd)
    for copy_it in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"loaded from an export .* pickle the directory path and dcfx.load"):
            copy_it(loaded)
