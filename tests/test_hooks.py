"""Hooks that change weights at call time, on the pipeline a user holds.

diffusers' layerwise casting is traced into the graphs (the graphs keep the stored weights and
cast them per call, as the hook does); offloading (accelerate's cpu_offload, disk_offload,
sequential and model CPU offload; diffusers' group offloading) and diffusers' stateful hooks
are refused at compile time, naming what is on the model and what to do, never with an error
about the cut or a device mismatch. Doing what the error says then works.
"""

from __future__ import annotations

import accelerate
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import dcfx
from tests.pipelines.builders import make_sd, run_txt2img, run_with_helper

FP8 = torch.float8_e4m3fn


def _unet(pipe):
    return getattr(pipe.unet, "model", pipe.unet)


def _cpu_offload(pipe, tmp_path):
    accelerate.cpu_offload(pipe.unet, execution_device="cpu")


def _disk_offload(pipe, tmp_path):
    accelerate.disk_offload(pipe.unet, tmp_path / "offload", execution_device="cpu")


def _sequential(pipe, tmp_path):
    pipe.enable_sequential_cpu_offload(device="cpu")


def _model_offload(pipe, tmp_path):
    pipe.enable_model_cpu_offload(device="cpu")


def _group_offload(pipe, tmp_path):
    cpu = torch.device("cpu")
    _unet(pipe).enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)


class _Counter(ModelHook):
    _is_stateful = True  # like diffusers' caches: state carried from call to call

    def __init__(self):
        super().__init__()
        self.calls = 0

    def post_forward(self, module, output):
        self.calls += 1
        return output

    def reset_state(self, module):
        self.calls = 0
        return module


def _stateful(pipe, tmp_path):
    HookRegistry.check_if_exists_or_initialize(_unet(pipe).mid_block).register_hook(_Counter(), "counter")


# kind: (apply it to a pipeline, the error's words, whether the plain pipeline runs with it here).
# accelerate's per-module offloading fails by itself on a CPU-only host (accelerate 1.16: "Cannot
# copy out of meta tensor" in the time embedding; sequential offload: a Parameter re-made with
# requires_grad); dcfx refuses it before any of that runs.
OFFLOADING = {
    "accelerate cpu_offload": (_cpu_offload, r"accelerate offloads this module's weights \(AlignDevicesHook", False),
    "accelerate disk_offload": (_disk_offload, r"accelerate offloads this module's weights \(AlignDevicesHook", False),
    "sequential CPU offload": (_sequential, r"pipe\.enable_sequential_cpu_offload\(\)", False),
    "model CPU offload": (_model_offload, r"model CPU offload \(pipe\.enable_model_cpu_offload\(\)", True),
    "diffusers group offloading": (_group_offload, r"diffusers group offloading", True),
    "a stateful diffusers hook": (_stateful, r"'counter' \(_Counter\) keeps state across calls", True),
}


@pytest.mark.parametrize("kind", sorted(OFFLOADING))
def test_offloading_is_refused_by_name_at_compile(kind, tmp_path):
    apply, match, runs_here = OFFLOADING[kind]
    pipe = make_sd()
    plain = run_txt2img(pipe)
    apply(pipe, tmp_path)
    if runs_here:
        torch.testing.assert_close(run_txt2img(pipe), plain, atol=1e-5, rtol=0)  # the hooks themselves work
    with pytest.raises(ValueError, match=match) as info:
        dcfx.enable(pipe, branch=0, interval=3)
    assert "cat(" not in str(info.value) and "move the inputs" not in str(info.value)
    assert not isinstance(pipe.unet, dcfx.DeepCacheUNet)  # nothing changed on the pipeline


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["accelerate cpu_offload", "sequential CPU offload"])
def test_removing_the_offloading_hooks_as_the_error_says_then_works(kind, tmp_path):
    pipe = make_sd()
    plain = run_txt2img(pipe)
    OFFLOADING[kind][0](pipe, tmp_path)
    with pytest.raises(ValueError, match="remove the hooks"):
        dcfx.enable(pipe, branch=0, interval=1)
    pipe.remove_all_hooks()
    dcfx.enable(pipe, branch=0, interval=1)
    torch.testing.assert_close(run_txt2img(pipe), plain, atol=0, rtol=0)


def test_offloading_switched_on_after_compile_is_refused_at_the_next_generation(tmp_path):
    pipe = make_sd()
    dcfx.enable(pipe, branch=0, interval=3)
    run_txt2img(pipe)
    _group_offload(pipe, tmp_path)
    with pytest.raises(ValueError, match=r"diffusers group offloading"):
        run_txt2img(pipe)
    assert pipe.unet.graph_builds == 1  # the graphs of the model before the change are dropped, none built


@pytest.mark.slow
def test_layerwise_casting_is_traced_into_the_graphs():
    pipe = make_sd()
    full_precision = run_txt2img(pipe)
    _unet(pipe).enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.float32)
    plain = run_txt2img(pipe)
    assert (plain - full_precision).abs().max() > 1e-3  # fp8 storage changes the image
    want = run_with_helper(pipe, run_txt2img, 0, 3)
    dcfx.enable(pipe, branch=0, interval=3)
    torch.testing.assert_close(run_txt2img(pipe), want, atol=1e-5, rtol=0)
    pipe.unet.reschedule(interval=1)
    torch.testing.assert_close(run_txt2img(pipe), plain, atol=0, rtol=0)
    # The graphs keep the stored fp8 weights, shared with the model (no fp32 copy).
    (pair,) = set(pipe.unet._rt.graphs.pairs.values())
    stored = {p.data_ptr() for p in _unet(pipe).parameters() if p.dtype == FP8}
    graph = {p.data_ptr() for p in pair.full.parameters() if p.dtype == FP8}
    assert stored and graph == stored
    assert all(p.dtype == FP8 for p in _unet(pipe).down_blocks.parameters() if p.ndim > 1)
