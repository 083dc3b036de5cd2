"""The bad-input matrix of exports and loads (the rest: tests/test_bad_input.py).

``dcfx.export`` refuses bad arguments before it captures anything; ``dcfx.load`` refuses bad
options before it opens a graph; a loaded export refuses calls outside its profile and goes
on with the generation in progress.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import dcfx
from tests.export.conftest import SD_BRANCH, sd_example, sd_unet

writer_module = importlib.import_module("dcfx.export.writer")  # where the export captures

# (name, dcfx.export keywords, error, message pattern)
EXPORT_CASES = [
    (
        "unknown format",
        {"format": "tflite"},
        ValueError,
        "unknown export format 'tflite'; registered: aoti, onnx, tensorrt",
    ),
    ("branch out of range", {"branch": 7}, ValueError, r"branch 7 is out of range .* valid branch ids: 0\.\.3"),
    ("unknown shape name", {"shapes": {"depth": 2}}, ValueError, r"unknown shape name\(s\) \['depth'\]; shapes takes"),
    ("shape range reversed", {"shapes": {"height": (32, 8)}}, ValueError, r"must satisfy 1 <= min <= opt <= max"),
    ("height not a multiple", {"shapes": {"height": (8, 15)}}, ValueError, "15 is not a multiple of 2"),
    ("batch not an int", {"shapes": {"batch": "2"}}, ValueError, r"shapes\['batch'\] must be an int"),
    ("unknown onnx option", {"workspace": 1 << 30}, TypeError, r"format 'onnx' got unknown option.*opset"),
    (
        "example outside the shapes",
        {"shapes": {"batch": 2, "height": 16, "width": 16}, "example": sd_example(size=24)},
        ValueError,
        r"example's height 24 is outside shapes\['height'\] \(exactly 16\)",
    ),
    ("example without a sample", {"example": {"timestep": 1}}, ValueError, "example must be the keyword arguments"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_refuses_before_any_work(tmp_path, monkeypatch, name, kwargs, error, match):
    monkeypatch.setattr(writer_module, "export_programs", lambda *a, **k: pytest.fail("captured"))
    options = {"branch": SD_BRANCH, "format": "onnx", "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        dcfx.export(sd_unet(), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


# (name, dcfx.load keywords, error, message pattern)
LOAD_CASES = [
    ("another branch", {"branch": 0}, ValueError, f"holds the graphs of branch {SD_BRANCH}; export again for branch 0"),
    ("bad interval", {"interval": 0}, ValueError, "interval must be an int >= 1, got 0"),
    ("unknown option", {"cuda_graph": True}, TypeError, r"unknown option\(s\) \['cuda_graph'\].*providers"),
    (
        "missing provider",
        {"providers": ["NoSuchExecutionProvider"]},
        ValueError,
        r"providers \['NoSuchExecutionProvider'\] are not available here; available: \[.*'CPUExecutionProvider'",
    ),
    ("providers as a string", {"providers": "CPUExecutionProvider"}, TypeError, "providers must be a list"),
    ("device", {"device": "mps"}, ValueError, "dcfx runs ONNX exports on cpu or cuda devices, not mps"),
    ("non-uniform, no step count", {"schedule": "non-uniform"}, ValueError, "needs the step count"),
]


@pytest.mark.slow  # one ONNX export of the SD layout for the module (~30 s)
@pytest.mark.parametrize(("name", "kwargs", "error", "match"), LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_refuses(onnx_sd, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        dcfx.load(onnx_sd, **kwargs)


@pytest.mark.slow  # one ONNX export of the SD layout for the module (~30 s)
def test_load_takes_another_schedule_with_its_own_fields(onnx_sd):
    loaded = dcfx.load(onnx_sd, schedule="non-uniform", interval=2, center=3, steps=10)
    assert loaded.deepcache_config == dcfx.DeepCacheConfig(
        branch=SD_BRANCH, interval=2, schedule="non-uniform", center=3, steps=10
    )


@pytest.mark.slow  # one ONNX export of the SD layout for the module (~30 s)
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"encoder_hidden_states": torch.randn(2, 30, 8)},
            ValueError,
            r"dim 1 \(tokens\) is 30, outside the exported range 3..21",
        ),
        ({"sample": torch.randn(2, 4, 40, 16)}, ValueError, r"\(height\) is 40"),
        ({"sample": torch.randn(2, 4, 16, 16).double()}, TypeError, "sample has dtype torch.float64"),
        ({"cross_attention_kwargs": {"scale": 0.5}}, TypeError, r"this export takes no LoRA scale"),
    ],
    ids=["tokens", "height", "dtype", "lora-scale"],
)
def test_a_loaded_export_refuses_calls_outside_its_profile_and_goes_on(onnx_sd, change, error, match):
    loaded = dcfx.load(onnx_sd, interval=3)
    call = sd_example()
    first = loaded(**dict(call, timestep=900)).sample
    with pytest.raises(error, match=match):
        loaded(**dict(call, timestep=800, **change))
    second = loaded(**dict(call, timestep=800)).sample
    assert loaded.stats == {"full": 1, "shallow": 1}
    fresh = dcfx.load(onnx_sd, interval=3)
    torch.testing.assert_close(fresh(**dict(call, timestep=900)).sample, first, atol=0, rtol=0)
    torch.testing.assert_close(fresh(**dict(call, timestep=800)).sample, second, atol=0, rtol=0)
