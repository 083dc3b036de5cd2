"""Exports on a CUDA GPU: onnxruntime's CUDA provider, AOTInductor for CUDA, TensorRT engines (U-Net, transformers).

Each test skips cleanly where its runtime is missing (no GPU, no TensorRT, no CUDA provider).
Per-call times are printed (run with -s) for the closing notes; no speed is asserted here.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.export.conftest import SD_BRANCH, SD_SHAPES, export_sd, sample_loop, sd_example, sd_unet

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")


def _ort_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _check_against_eager(loaded, sizes=((2, 16, 16), (4, 32, 24), (1, 8, 8)), atol=1e-4):
    eager = dcfx.compile(sd_unet().cuda(), branch=SD_BRANCH, interval=3)
    for batch, h, w in sizes:
        g = torch.Generator(device="cuda").manual_seed(batch + h + w)
        x = torch.randn(batch, 4, h, w, device="cuda", generator=g)
        ehs = torch.randn(batch, 7, 8, device="cuda", generator=g)
        for t in (900, 800, 700):
            torch.testing.assert_close(
                loaded(x, t, encoder_hidden_states=ehs).sample,
                eager(x, t, encoder_hidden_states=ehs).sample,
                atol=atol,
                rtol=0,
            )
    assert loaded.stats == eager.stats


def _per_call_ms(loaded, batch=2, size=16, calls=30):
    x = torch.randn(batch, 4, size, size, device="cuda")
    ehs = torch.randn(batch, 7, 8, device="cuda")
    times = {"full": [], "shallow": []}
    for i in range(calls):
        kind = "full" if i % 3 == 0 else "shallow"
        torch.cuda.synchronize()
        start = time.perf_counter()
        loaded(x, 999 - i, encoder_hidden_states=ehs)
        torch.cuda.synchronize()
        times[kind].append((time.perf_counter() - start) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


@needs_cuda
@pytest.mark.skipif(not _ort_cuda(), reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
def test_onnx_on_the_cuda_provider(tmp_path):
    loaded = dcfx.load(export_sd(tmp_path / "onnx"), device="cuda")
    _check_against_eager(loaded)
    print("onnxruntime CUDA per call (ms):", _per_call_ms(loaded))


@needs_cuda
def test_aoti_for_cuda(tmp_path):
    example = {k: v.cuda() for k, v in sd_example().items()}
    out = dcfx.export(
        sd_unet().cuda(),
        tmp_path / "aoti",
        branch=SD_BRANCH,
        format="aoti",
        shapes=SD_SHAPES,
        example=example,
        progress=False,
    )
    loaded = dcfx.load(out)
    assert loaded.device.type == "cuda"
    _check_against_eager(loaded)
    print("AOTInductor CUDA per call (ms):", _per_call_ms(loaded))


@needs_cuda
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_engines(tmp_path_factory, precision, cuda_graph):
    out = export_sd(tmp_path_factory.mktemp("trt") / precision, format="tensorrt", precision=precision)
    assert (out / "timing.cache").exists() and (out / "trtexec.sh").exists()
    loaded = dcfx.load(out, cuda_graph=cuda_graph)
    _check_against_eager(loaded, atol=1e-3 if precision == "fp32" else 5e-2)
    print(f"TensorRT {precision} cuda_graph={cuda_graph} per call (ms):", _per_call_ms(loaded))


@pytest.fixture(scope="module")
def tensorrt_fp32(tmp_path_factory):
    return export_sd(tmp_path_factory.mktemp("trt") / "forecast", format="tensorrt", precision="fp32")


@needs_cuda
@needs_tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_forecast(tensorrt_fp32, cuda_graph):
    out = tensorrt_fp32
    assert (out / "forecast.plan").exists() and "--onnx=forecast.onnx" in (out / "trtexec.sh").read_text()
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(2, 4, 16, 24, device="cuda", generator=g)
    call = {"encoder_hidden_states": torch.randn(2, 7, 8, device="cuda", generator=g)}
    scheduler = DDIMScheduler()
    eager = dcfx.compile(sd_unet().cuda(), branch=SD_BRANCH, interval=3, forecast="linear", scheduler=scheduler)
    want = sample_loop(eager, scheduler, call, x)
    loaded = dcfx.load(out, forecast="linear", scheduler=scheduler, cuda_graph=cuda_graph)
    got = sample_loop(loaded, scheduler, call, x)
    assert loaded.stats == eager.stats == {"full": 4, "shallow": 6}
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    reuse = sample_loop(dcfx.load(out, scheduler=scheduler, cuda_graph=cuda_graph), scheduler, call, x)
    assert (got - reuse).abs().max() > 1e-2, "forecasting changed nothing: the test would be vacuous"

    # Both feature buffers are bound where they lie: a second generation keeps their addresses
    # and gives the same latents; with CUDA graphs, the forecast engine has at most one
    # capture per order of the two buffers (they trade roles on each full step).
    state = loaded._state()
    addresses = {b.data_ptr() for b in state.buffers}
    assert len(addresses) == 2
    torch.testing.assert_close(sample_loop(loaded, scheduler, call, x), got, atol=1e-5, rtol=0)
    assert {b.data_ptr() for b in state.buffers} == addresses
    if cuda_graph:
        forecast_keys = [key for key in loaded._build.pair._graphs if key[0] == "forecast"]
        assert 1 <= len(forecast_keys) <= 2 and all(set(key[2]) == addresses for key in forecast_keys)
    timed = dcfx.load(out, forecast="linear", cuda_graph=cuda_graph)  # no scheduler: timesteps 999, 998, ...
    print(f"TensorRT fp32 forecast cuda_graph={cuda_graph} per call (ms):", _per_call_ms(timed))


def _tiny_on_cuda(name: str):
    from tests.transformers.tiny import BUILDERS

    t = BUILDERS[name]()
    t.pipe.to("cuda")
    t.pipe.set_progress_bar_config(disable=True)
    t.call = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in t.call.items()}
    return t


@needs_cuda
@needs_tensorrt
@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_tensorrt_engines_of_a_transformer_pair(tmp_path, name):
    # The block-range cut's pair as engines (Wan: a video's frames static at the example's), in
    # the model's own pipeline against dcfx.enable's eager runtime on the same GPU.
    cut = {"first": 1, "last": 1, "interval": 2}
    t = _tiny_on_cuda(name)
    example = t.recorded_call()
    out = dcfx.export(t.transformer, tmp_path / name, format="tensorrt", precision="fp32", example=example, **cut)
    reference, loaded = _tiny_on_cuda(name), _tiny_on_cuda(name)
    dcfx.enable(reference.pipe, **cut)
    loaded.pipe.transformer = dcfx.load(out, scheduler=loaded.pipe.scheduler)
    want, got = reference.generate(6, seed=3), loaded.generate(6, seed=3)
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    assert loaded.pipe.transformer.stats == reference.pipe.transformer.stats
