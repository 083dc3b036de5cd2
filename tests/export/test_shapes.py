"""Shape ranges, shape expressions and input checks of an export (no export needed)."""

from __future__ import annotations

import pytest
import torch

from dcfx.export.shapes import DimRange, TensorSpec, bind_inputs, evaluate, parse_dims


def test_parse_dims_forms_and_defaults():
    dims = parse_dims({"batch": 2, "height": (16, 64), "width": (16, 32, 64)}, sample_size=64, multiple=8)
    assert dims["batch"] == DimRange("batch", 2, 2, 2, 1) and dims["batch"].static
    assert (dims["height"].min, dims["height"].opt, dims["height"].max) == (16, 64, 64)  # opt: sample_size
    assert dims["width"] == DimRange("width", 16, 32, 64, 8)
    default = parse_dims(None, sample_size=64, multiple=8)
    assert (default["batch"].min, default["batch"].opt, default["batch"].max) == (1, 2, 4)
    assert (default["height"].min, default["height"].opt, default["height"].max) == (32, 64, 128)


def test_a_video_models_frames():
    # Latent frames: static at the typical call's unless shapes names them; only a video model's.
    dims = parse_dims(None, sample_size=8, multiple=2, tokens=6, frames=3)
    assert dims["frames"] == DimRange("frames", 3, 3, 3, 1)
    dims = parse_dims({"frames": (1, 21)}, sample_size=8, multiple=2, tokens=6, frames=3)
    assert dims["frames"] == DimRange("frames", 1, 3, 21, 1)  # opt: the typical call's
    with pytest.raises(ValueError, match=r"4 is not a multiple of 3; .* latent frame counts must be multiples"):
        parse_dims({"frames": (3, 4)}, sample_size=8, multiple=2, frames=3, frame_multiple=3)
    with pytest.raises(ValueError, match=r"unknown shape name\(s\) \['frames'\] \(this model takes images\)"):
        parse_dims({"frames": 2}, sample_size=8, multiple=2, tokens=6)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({"depth": 3}, "unknown shape name"),
        ({"height": (64, 16)}, "min <= opt <= max"),
        ({"height": (0, 16)}, "min <= opt <= max"),
        ({"height": (16, 60)}, "60 is not a multiple of 8"),
        ({"batch": (1, 2.5, 4)}, "must hold ints"),
        ({"batch": "2"}, "must be an int"),
        ({"batch": True}, "must be an int"),
        ({"batch": (1, 2, 3, 4)}, "must be an int"),
    ],
)
def test_parse_dims_refuses(shapes, match):
    with pytest.raises(ValueError, match=match):
        parse_dims(shapes, sample_size=64, multiple=8)


def test_evaluate_expressions():
    values = {"batch": 3, "height": 64, "width": 48}
    assert evaluate(4, values) == 4
    assert evaluate("batch", values) == 3
    assert evaluate("height/2", values) == 32
    assert evaluate("2*width - 8", values) == 88
    assert evaluate("height//3", values) == 21
    with pytest.raises(ValueError, match="not a whole number"):
        evaluate("height/3", values)
    with pytest.raises(ValueError, match="unknown dimension"):
        evaluate("depth", values)
    with pytest.raises(ValueError, match="divides by zero"):
        evaluate("height/(width-48)", values)


@pytest.mark.parametrize("expr", ["__import__('os').getcwd()", "height.real", "[1][0]", "height ** 2", "'a'"])
def test_evaluate_runs_no_code(expr):
    with pytest.raises(ValueError):
        evaluate(expr, {"height": 4})


SPECS = [
    TensorSpec("sample", "sample", "float32", ("batch", 4, "height", "width")),
    TensorSpec("timestep", "timestep", "float32", ("batch",)),
    TensorSpec("added_cond_kwargs.text_embeds", "added_cond_kwargs_text_embeds", "float32", ("batch", 8)),
]
DIMS = parse_dims({"batch": (1, 4), "height": (16, 64), "width": (16, 64)}, sample_size=32, multiple=8)


def call(batch=2, h=32, w=16, text_batch=None, dtype=torch.float32):
    return [
        torch.zeros(batch, 4, h, w, dtype=dtype),
        torch.zeros(batch),
        torch.zeros(text_batch or batch, 8),
    ]


def test_bind_inputs_reads_the_dims():
    assert bind_inputs(SPECS, call(3, 40, 16), DIMS) == {"batch": 3, "height": 40, "width": 16}


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (call(batch=5), r"'sample' dim 0 \(batch\) is 5, outside the exported range 1..4"),
        (call(h=72), r"'sample' dim 2 \(height\) is 72, outside the exported range 16..64 in multiples of 8"),
        (call(h=36), r"dim 2 \(height\) is 36"),
        (call(text_batch=3), r"'added_cond_kwargs.text_embeds' dim 0 is 3; the export takes batch = 2 there"),
        (call(dtype=torch.float16), "dtype float16; the export takes float32"),
        (call()[:2], "takes inputs"),
        ([torch.zeros(2, 4, 32), *call()[1:]], "rank 4"),
    ],
)
def test_bind_inputs_names_what_is_off(tensors, match):
    with pytest.raises(ValueError, match=match):
        bind_inputs(SPECS, tensors, DIMS)


def test_tensor_spec_round_trip():
    for spec in SPECS:
        assert TensorSpec.from_dict(spec.to_dict()) == spec
    assert SPECS[0].size({"batch": 2, "height": 16, "width": 24}) == (2, 4, 16, 24)
