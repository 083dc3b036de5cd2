"""Offloading on a real GPU: the plain pipeline runs offloaded, dcfx refuses by name, and runs once removed."""

import pytest
import torch

import dcfx
from tests.pipelines.builders import make_sd, run_txt2img

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("offload", "match"),
    [
        ("enable_model_cpu_offload", r"model CPU offload \(pipe\.enable_model_cpu_offload\(\)"),
        ("enable_sequential_cpu_offload", r"accelerate offloads this module's weights"),
    ],
)
def test_offloaded_pipelines_are_refused_by_name_then_run_without_it(offload, match):
    pipe = make_sd()
    pipe.to("cuda")
    plain = run_txt2img(pipe).cpu()
    pipe.to("cpu")
    getattr(pipe, offload)()  # the CUDA device by default
    offloaded = run_txt2img(pipe).cpu()
    torch.testing.assert_close(offloaded, plain, atol=1e-4, rtol=1e-4)  # the hooks work on their own
    with pytest.raises(ValueError, match=match):
        dcfx.enable(pipe, branch=0, interval=1)
    pipe.remove_all_hooks()
    pipe.to("cuda")
    dcfx.enable(pipe, branch=0, interval=1)
    torch.testing.assert_close(run_txt2img(pipe).cpu(), plain, atol=1e-4, rtol=1e-4)
