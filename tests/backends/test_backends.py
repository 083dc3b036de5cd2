"""Backends: the registry and a registered backend in use (Inductor: tests/pipelines)."""

import pytest
from diffusers import DDIMScheduler

import dcfx
from dcfx.backends import available_backends, get_backend
from tests.fixtures import tiny_sd
from tests.test_runtime import denoise


def test_registry_lists_and_rejects():
    assert {"eager", "inductor"} <= set(available_backends())
    with pytest.raises(ValueError, match="registered: eager, inductor"):
        get_backend("onnx")


def test_a_registered_backend_is_used_by_compile():
    seen = []

    @dcfx.register_backend("recording-test", options=("tag",))
    def recording(full, shallow, example_inputs, tag=None):
        seen.append((tag, len(example_inputs)))
        return get_backend("eager")(full, shallow, example_inputs)

    unet = tiny_sd()
    fast = dcfx.compile(unet, backend="recording-test", tag="x")
    denoise(fast, DDIMScheduler(), steps=2)
    assert seen == [("x", 3)]


# Inductor itself (results against eager, no recompiles across generations, freezing) is
# tested on a whole pipeline: tests/pipelines/test_pipelines.py::test_pipeline_under_inductor.
