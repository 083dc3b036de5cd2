"""Exports of the latent-diffusion UNetModel: ONNX (dynamic) and AOTInductor (static, slow).

The loaded runtime takes the model's own call (``x``, ``timesteps``, ``context``, ``y``) and
returns a tensor, in a process that can import neither ldm nor diffusers; TensorRT's build
plan (it cannot run here) gets the same input names and shape ranges.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

import dcfx
from dcfx.export.manifest import read_manifest
from dcfx.export.trt_plan import build_plan
from tests.fixtures import tiny_ldm_class, tiny_ldm_text

pytestmark = pytest.mark.slow  # exports of a whole model each; the fast tier has tests/export/test_onnx.py

ATOL = 1e-4
SHAPES = {"batch": (1, 2, 4), "height": (8, 16, 32), "width": (8, 16, 32)}
BRANCH = 1


def text_unet() -> torch.nn.Module:
    return tiny_ldm_text(num_res_blocks=1)  # 4 output blocks: a quicker export


def text_example(batch: int = 2, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(batch, 4, size, size, generator=g),
        "timesteps": torch.full((batch,), 500),
        "context": torch.randn(batch, 7, 24, generator=g),
    }


@pytest.fixture(scope="module")
def onnx_ldm(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "ldm"
    return dcfx.export(
        text_unet(),
        out,
        branch=BRANCH,
        interval=3,
        format="onnx",
        shapes=SHAPES,
        example=text_example(),
        progress=False,
    )


def ddim_like_calls(unet, batch, height, width):
    g = torch.Generator().manual_seed(batch * 1000 + height + width)
    x = torch.randn(batch, 4, height, width, generator=g)
    context = torch.randn(batch, 7, 24, generator=g)
    return [unet(x, torch.full((batch,), t), context=context) for t in (901, 801, 701, 601, 501)]


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (2, 16, 24), (4, 32, 32)])
def test_onnx_matches_the_eager_runtime(onnx_ldm, batch, height, width):
    loaded = dcfx.load(onnx_ldm)
    eager = dcfx.compile(text_unet(), branch=BRANCH, interval=3)
    with torch.no_grad():
        got, want = ddim_like_calls(loaded, batch, height, width), ddim_like_calls(eager, batch, height, width)
    assert loaded.stats == eager.stats == {"full": 2, "shallow": 3}
    for a, b in zip(got, want, strict=True):
        assert type(a) is torch.Tensor
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_manifest_names_the_models_inputs_and_tensorrt_gets_them(onnx_ldm):
    manifest = read_manifest(onnx_ldm)
    model = manifest.model
    assert model["class"] == "UNetModel" and model["output"] == "tensor"
    assert model["inputs"] == {"sample": "x", "timestep": "timesteps", "context": "context"}
    assert model["config"]["in_channels"] == 4 and model["config"]["context_dim"] == 24
    assert model["shallow_layers"][-2:] == ["output_blocks.3", "out"]
    full = manifest.graphs["full"]
    assert [(s.name, s.dtype, s.shape) for s in full.inputs] == [
        ("x", "float32", ("batch", 4, "height", "width")),
        ("timesteps", "float32", ("batch",)),
        ("context", "float32", ("batch", 7, 24)),
    ]
    plan = build_plan(manifest.graphs, manifest.dims, precision="fp16")
    assert plan["full"].profile["x"] == ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32))
    assert plan["full"].profile["timesteps"] == ((1,), (2,), (4,))
    assert plan["full"].profile["context"] == ((1, 7, 24), (2, 7, 24), (4, 7, 24))
    # Branch 1 caches the input of output_blocks[2]: the deeper level's upsampled 64 channels.
    assert plan["shallow"].profile["cache_feature"] == ((1, 64, 8, 8), (2, 64, 16, 16), (4, 64, 32, 32))
    assert "--optShapes=x:2x4x16x16,timesteps:2,context:2x7x24" in plan["full"].trtexec()


def test_loaded_export_refuses_calls_it_cannot_take(onnx_ldm):
    loaded = dcfx.load(onnx_ldm)
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 500)
    with pytest.raises(ValueError, match=r"'context' dim 1 is 9; the export takes exactly 7"):
        loaded(x, t, context=torch.randn(2, 9, 24))
    with pytest.raises(TypeError, match="missing a required argument: 'timesteps'"):
        loaded(x, context=torch.randn(2, 7, 24))


FRESH = textwrap.dedent(
    """
    import sys
    sys.modules["diffusers"] = None  # any import of diffusers or ldm now raises ImportError
    sys.modules["ldm"] = None
    import numpy as np, torch
    import dcfx
    unet = dcfx.load(sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2] + "/x.npy", allow_pickle=False))
    context = torch.from_numpy(np.load(sys.argv[2] + "/context.npy", allow_pickle=False))
    for i, t in enumerate((901, 801, 701)):
        out = unet(x, torch.full((x.shape[0],), t), context=context)
        np.save(f"{sys.argv[2]}/out{i}.npy", out.numpy(), allow_pickle=False)
    print(type(out).__name__, unet.stats["full"], unet.stats["shallow"])
    """
)


def test_loads_in_a_process_without_ldm_or_diffusers(onnx_ldm, tmp_path):
    call = text_example()
    np.save(tmp_path / "x.npy", call["x"].numpy(), allow_pickle=False)
    np.save(tmp_path / "context.npy", call["context"].numpy(), allow_pickle=False)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(onnx_ldm), str(tmp_path)], capture_output=True, text=True, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["Tensor", "1", "2"]
    eager = dcfx.compile(text_unet(), branch=BRANCH, interval=3)
    for i, t in enumerate((901, 801, 701)):
        with torch.no_grad():
            want = eager(call["x"], torch.full((2,), t), context=call["context"])
        got = torch.from_numpy(np.load(tmp_path / f"out{i}.npy", allow_pickle=False))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_aoti_export_of_a_class_conditional_model(tmp_path):
    unet = tiny_ldm_class(num_res_blocks=1)
    out = dcfx.export(
        unet,
        tmp_path / "aoti",
        branch=2,
        interval=2,
        format="aoti",
        shapes={"batch": 2, "height": 16, "width": 16},
        progress=False,
    )
    manifest = read_manifest(out)
    assert [(s.name, s.dtype) for s in manifest.graphs["full"].inputs] == [
        ("x", "float32"),
        ("timesteps", "float32"),
        ("y", "int64"),
    ]
    loaded, eager = dcfx.load(out), dcfx.compile(unet, branch=2, interval=2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([4, 9])
    with torch.no_grad():
        for t in (901, 801, 701, 601):
            got = loaded(x, torch.full((2,), t), y=y)
            torch.testing.assert_close(got, eager(x, torch.full((2,), t), y=y), atol=ATOL, rtol=0)
    assert loaded.stats == eager.stats == {"full": 2, "shallow": 2}
