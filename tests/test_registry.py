"""The shared registry behind backends and export formats, and the errors users see from it."""

from __future__ import annotations

import pytest

import dcfx
from dcfx.export.program import trace_size
from dcfx.export.shapes import DimRange
from dcfx.registry import Registry
from tests.fixtures import tiny_unet


def test_registry_names_entries_and_options():
    registry = Registry("widget")
    registry.add("b", 2, options=("speed",))
    registry.add("a", 1)
    assert registry.names() == ["a", "b"] and registry.get("b") == 2
    registry.check_options("b", {"speed": 3})
    with pytest.raises(ValueError, match="unknown widget 'c'; registered: a, b"):
        registry.get("c")
    with pytest.raises(TypeError, match=r"widget 'a' got unknown option\(s\) \['speed'\]; it takes: none"):
        registry.check_options("a", {"speed": 1})


def test_export_refuses_an_unknown_format_or_option_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'; registered: aoti, onnx, tensorrt"):
        dcfx.export(tiny_unet(), tmp_path / "x", format="tflite", progress=False)
    with pytest.raises(TypeError, match=r"export format 'onnx' got unknown option\(s\) \['opsett'\]; it takes: opset"):
        dcfx.export(tiny_unet(), tmp_path / "x", format="onnx", opsett=18, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("dim", "size"),
    [
        (DimRange("batch", 1, 1, 4), 2),  # a size of 1 would be specialised by torch.export
        (DimRange("batch", 1, 3, 4), 3),
        (DimRange("batch", 1, 1, 1), 1),  # static: traced as it is
        (DimRange("height", 8, 8, 64, 8), 16),  # one unit of the multiple: moved to two
        (DimRange("height", 8, 8, 8, 8), 8),
    ],
)
def test_trace_size_avoids_size_one_units(dim, size):
    assert trace_size(dim) == size
