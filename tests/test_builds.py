"""Which build ``dcfx.compile`` picks per (backend, shape mode), and what it refuses by name.

Nothing is captured or compiled here: a build works at the first call, and the refusals
come at compile, before any work.
"""

from __future__ import annotations

import pytest
import torch

import dcfx
from dcfx.builds import AheadOfTime, BuildRequest, CaptureAndCompile, RangedCapture, make_build
from dcfx.passes import PASSES, PassContext, partition
from dcfx.passes.cuts import SkipCut
from dcfx.passes.forecast import COEFFICIENT_INPUT
from tests.fixtures import tiny_unet
from tests.passes.micro import micro_context

RANGES = {"batch": (1, 2), "height": (8, 16), "width": (8, 16), "tokens": (2, 8)}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def build_of(runtime):
    return runtime._rt.graphs.build


@pytest.mark.parametrize(
    ("backend", "settings", "kind"),
    [
        ("eager", {}, CaptureAndCompile),
        ("eager", {"dynamic": RANGES}, RangedCapture),
        ("inductor", {}, CaptureAndCompile),
        ("inductor", {"dynamic": RANGES}, AheadOfTime),
        ("inductor", {"cache_dir": "unused"}, AheadOfTime),
    ],
)
def test_each_backend_and_shape_mode_gets_its_build(unet, tmp_path, backend, settings, kind):
    if "cache_dir" in settings:
        settings = {"cache_dir": tmp_path}
    runtime = dcfx.compile(unet, branch=0, backend=backend, **settings)
    build = build_of(runtime)
    assert type(build) is kind
    call = {"sample": torch.zeros(1, 4, 8, 8), "encoder_hidden_states": torch.zeros(1, 4, 32)}
    names, tensors = ("sample", "encoder_hidden_states"), tuple(call.values())
    assert (build.bucket(names, tensors) is None) == (
        "dynamic" not in settings
    )  # a ranged build shares one pair per bucket


def test_a_backend_without_ranges_is_refused_by_name(unet):
    request = BuildRequest(unet, 0, "my-backend", {}, dims={})
    with pytest.raises(ValueError, match=r"built for the backends \['eager', 'inductor'\]; backend 'my-backend'"):
        make_build(request)


@pytest.mark.parametrize("dynamic", [None, RANGES], ids=["static", "ranged"])
def test_a_cache_dir_for_a_backend_that_keeps_nothing_is_refused(unet, tmp_path, dynamic):
    with pytest.raises(ValueError, match="cache_dir= keeps compiled graphs for the inductor backend; backend 'eager'"):
        dcfx.compile(unet, branch=0, cache_dir=tmp_path, dynamic=dynamic)
    assert not any(tmp_path.iterdir())


def test_a_torch_compile_mode_ahead_of_time_is_refused(unet):
    with pytest.raises(TypeError, match=r"mode= is a torch\.compile setting"):
        dcfx.compile(unet, branch=0, backend="inductor", dynamic=RANGES, mode="max-autotune")


def test_the_pass_list_runs_in_order_and_makes_the_forecast_graph():
    assert [p.__name__ for p in PASSES] == ["locate", "partition", "clean", "verify", "forecast"]
    _, ctx, inputs, gm = micro_context(1)
    plain = partition(gm, ctx)
    assert plain.forecast is None and isinstance(ctx.cut, SkipCut)
    _, ctx, inputs, gm = micro_context(1)
    forecasting = partition(gm, PassContext(ctx.model, ctx.spec, ctx.input_names, ctx.layer, forecast=True))
    sample, feature = forecasting.full(*inputs)
    placeholders = [n.name for n in forecasting.forecast.graph.find_nodes(op="placeholder")]
    assert placeholders[-1] == COEFFICIENT_INPUT
    other = feature + 1.0
    with torch.no_grad():
        still = forecasting.forecast(*inputs, feature, other, torch.tensor(0.0))
        moved = forecasting.forecast(*inputs, feature, other, torch.tensor(1.0))
        want_moved = forecasting.shallow(*inputs, 2 * feature - other)
    torch.testing.assert_close(still, sample, rtol=0, atol=0)  # coefficient 0: the shallow graph's output
    torch.testing.assert_close(moved, want_moved)  # coefficient 1: f1 + (f1 - f0)
