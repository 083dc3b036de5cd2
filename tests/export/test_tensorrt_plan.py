"""TensorRT on a machine without it: what can be checked is checked (profiles, plans, commands)."""

from __future__ import annotations

import importlib.util

import pytest

import dcfx
from dcfx.export.manifest import ArtifactError, read_manifest
from dcfx.export.tensorrt import check_engine_compatible
from dcfx.export.trt_plan import build_plan, profile_shapes
from tests.export.conftest import sd_unet

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_profiles_from_the_manifest_ranges(onnx_sd):
    manifest = read_manifest(onnx_sd)
    full = profile_shapes(manifest.graphs["full"].inputs, manifest.dims)
    assert full["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32))
    assert full["timestep"] == ((1,), (2,), (4,))
    assert full["encoder_hidden_states"] == ((1, 3, 8), (2, 7, 8), (4, 21, 8))  # tokens 3..21
    shallow = profile_shapes(manifest.graphs["shallow"].inputs, manifest.dims)
    assert shallow["cache_feature"] == ((1, 16, 8, 8), (2, 16, 16, 16), (4, 16, 32, 32))
    forecast = profile_shapes(manifest.graphs["forecast"].inputs, manifest.dims)
    # The previous feature has the feature's profile; the 0-d coefficient needs none.
    assert forecast["cache_previous"] == forecast["cache_feature"] == shallow["cache_feature"]
    assert list(forecast) == [*shallow, "cache_previous"]


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_engine_build_plan(onnx_sd):
    manifest = read_manifest(onnx_sd)
    plan = build_plan(manifest.graphs, manifest.dims, precision="fp32", workspace=1 << 30)
    assert list(plan) == ["full", "shallow", "forecast"]
    assert plan["full"].onnx == "full.onnx" and plan["full"].engine == "full.plan"
    assert plan["shallow"].profile["cache_feature"][2] == (4, 16, 32, 32)
    assert plan["forecast"].onnx == "forecast.onnx" and plan["forecast"].engine == "forecast.plan"
    assert plan["forecast"].profile["cache_previous"][0] == (1, 16, 8, 8)
    assert "--minShapes=" in plan["forecast"].trtexec() and "cache_previous:1x16x8x8" in plan["forecast"].trtexec()
    line = plan["full"].trtexec()
    assert "--fp16" not in line and "--memPoolSize=workspace:1024M" in line and "--timingCacheFile=timing.cache" in line
    with pytest.raises(ValueError, match="precision must be one of"):
        build_plan(manifest.graphs, manifest.dims, precision="int4")


@pytest.mark.slow  # the session's SD ONNX export: 30 s of the fast tier
def test_engine_for_another_gpu_or_version_is_refused(onnx_sd):
    manifest = read_manifest(onnx_sd)
    manifest.graphs["full"].file = "full.plan"
    manifest.format_data.update(tensorrt="10.3.0", gpu="NVIDIA H100", compute_capability="9.0")
    same = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    check_engine_compatible(manifest, onnx_sd, same)
    with pytest.raises(ArtifactError, match=r"full.plan was built for tensorrt '10.3.0', this machine has '10.8.0'"):
        check_engine_compatible(manifest, onnx_sd, {**same, "tensorrt": "10.8.0"})
    with pytest.raises(ArtifactError, match=r"compute_capability '9\.0', this machine has '8\.9'"):
        check_engine_compatible(manifest, onnx_sd, {**same, "compute_capability": "8.9", "gpu": "NVIDIA L4"})


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_format_without_tensorrt_fails_before_any_work(tmp_path):
    with pytest.raises(ImportError, match=r"trtexec\.sh"):
        dcfx.export(sd_unet(), tmp_path / "trt", format="tensorrt", progress=False)
    assert not (tmp_path / "trt").exists()
