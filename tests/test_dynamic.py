"""Dynamic shapes in dcfx.compile: one graph pair for every size in range, no recapture."""

from __future__ import annotations

import pytest
import torch

import dcfx
from dcfx.builds import narrowed_dims
from dcfx.export.manifest import read_manifest
from dcfx.export.shapes import DimRange
from tests.fixtures import tiny_unet

RANGES = {"batch": (1, 4), "height": (8, 32), "width": (8, 32), "tokens": (2, 16)}
SIZES = [(2, 16, 16, 7), (1, 16, 16, 7), (3, 24, 16, 7), (2, 32, 24, 14), (1, 8, 8, 3), (4, 8, 32, 16)]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def call_at(unet, batch, height, width, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, tokens, 8, generator=g),
    }


@pytest.mark.slow
def test_one_eager_pair_serves_every_size_in_range(unet):
    ranged = dcfx.compile(unet, branch=0, interval=2, dynamic=RANGES)
    static = dcfx.compile(unet, branch=0, interval=2)
    for size in SIZES:
        call = call_at(unet, *size)
        for t in (900, 700):  # a full step, then a shallow one
            got = ranged(**call, timestep=torch.tensor(t)).sample
            torch.testing.assert_close(got, static(**call, timestep=torch.tensor(t)).sample, atol=0, rtol=0)
    assert ranged.graph_builds == 1 and static.graph_builds == len(SIZES)
    assert len({id(p) for p in ranged._rt.graphs.pairs.values()}) == 1
    assert ranged.stats == static.stats == {"full": len(SIZES), "shallow": len(SIZES)}


@pytest.mark.slow
def test_ranges_without_tokens_take_the_first_calls_prompt_length(unet):
    ranged = dcfx.compile(unet, branch=0, interval=2, dynamic={"batch": (1, 3), "height": (8, 16)})
    ranged(**call_at(unet, 2, 16, 16, 4), timestep=900)  # 4 tokens, not CLIP's 77
    ranged(**call_at(unet, 1, 8, 16, 4), timestep=700)  # the generation changed size: a full step
    assert ranged.graph_builds == 1 and ranged.stats == {"full": 2, "shallow": 0}
    with pytest.raises(ValueError, match=r"tokens is 5, outside this runtime's range exactly 4"):
        ranged(**call_at(unet, 1, 8, 16, 5), timestep=900)


@pytest.mark.slow
def test_ten_shapes_hold_one_pair(unet):
    ranged = dcfx.compile(unet, branch=0, interval=2, dynamic=RANGES)
    for i in range(10):
        ranged(**call_at(unet, 1 + i % 4, 8 + 2 * (i % 12), 8 + 2 * ((i + 3) % 12), 2 + i), timestep=900)
    assert ranged.graph_builds == 1
    assert len({id(p) for p in ranged._rt.graphs.pairs.values()}) == 1  # one pair, one set of graphs
    assert ranged._state().buffer is not None and ranged._state().buffers[1] is None  # one feature buffer


def test_a_call_outside_the_range_is_refused_and_changes_nothing(unet):
    ranged = dcfx.compile(unet, branch=0, interval=2, dynamic=RANGES)
    call = call_at(unet, 2, 16, 16, 7)
    first = ranged(**call, timestep=900).sample
    with pytest.raises(ValueError, match=r"the call's batch is 5, outside this runtime's range 1\.\.4"):
        ranged(**call_at(unet, 5, 16, 16, 7), timestep=800)
    with pytest.raises(ValueError, match=r"the call's tokens is 20, outside this runtime's range 2\.\.16"):
        ranged(**call_at(unet, 2, 16, 16, 20), timestep=800)
    assert ranged.stats == {"full": 1, "shallow": 0}
    static = dcfx.compile(unet, branch=0, interval=2)
    static(**call, timestep=900)
    torch.testing.assert_close(ranged(**call, timestep=800).sample, static(**call, timestep=800).sample)
    assert ranged.stats == {"full": 1, "shallow": 1}  # the generation went on
    torch.testing.assert_close(first, static(**call, timestep=900).sample)


def test_dynamic_true_takes_default_ranges(unet):
    ranged = dcfx.compile(unet, branch=0, interval=2, dynamic=True)
    for size in [(1, 8, 8, 7), (2, 16, 32, 77)]:
        ranged(**call_at(unet, *size), timestep=900)
    assert ranged.graph_builds == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dynamic": "yes"}, TypeError, "dynamic must be True or a mapping"),
        ({"dynamic": {"depth": 3}}, ValueError, "unknown shape name"),
        ({"dynamic": {"height": (8, 31)}}, ValueError, "31 is not a multiple of 2"),
        ({"cache_dir": "/tmp/x"}, ValueError, "cache_dir= keeps compiled graphs for the inductor backend"),
        ({"dynamic": True, "backend": "inductor", "mode": "max-autotune"}, TypeError, "pass Inductor settings"),
    ],
)
def test_bad_dynamic_settings_are_refused(unet, kwargs, error, match):
    with pytest.raises(error, match=match):
        dcfx.compile(unet, branch=0, **kwargs)


def test_narrowed_dims_reads_torch_exports_suggestion():
    dims = {"batch": DimRange("batch", 1, 2, 16), "height": DimRange("height", 8, 16, 64, 8)}
    error = RuntimeError(
        "Constraints violated (batch)! ...\nSuggested fixes:\n  batch = Dim('batch', max=15)\n"
        "  height_units = Dim('height_units', min=2, max=6)"
    )
    narrowed = narrowed_dims(error, dims)
    assert narrowed["batch"] == DimRange("batch", 1, 2, 15)
    assert narrowed["height"] == DimRange("height", 16, 16, 48, 8)
    assert narrowed_dims(RuntimeError("something else"), dims) is None


class WouldCompile(Exception):
    pass


@pytest.mark.slow
def test_ahead_of_time_pair_serves_the_range_and_warm_starts_from_its_cache(unet, tmp_path, monkeypatch, caplog):
    import dcfx.builds

    ranges = {"batch": (1, 3), "height": (8, 24), "width": (8, 24), "tokens": (2, 8)}
    cold = dcfx.compile(unet, branch=0, interval=2, backend="inductor", dynamic=ranges, cache_dir=tmp_path)
    static = dcfx.compile(unet, branch=0, interval=2)
    sizes = [(2, 16, 16, 7), (1, 8, 24, 2), (3, 24, 8, 5)]
    want = {}
    for size in sizes:
        for t in (900, 700):
            call = call_at(unet, *size)
            want[size, t] = static(**call, timestep=torch.tensor(t)).sample
            torch.testing.assert_close(cold(**call, timestep=torch.tensor(t)).sample, want[size, t], atol=1e-4, rtol=0)
    assert cold.graph_builds == 1 and len(list(tmp_path.iterdir())) == 1
    # The packages are an export's: they carry the forecast graph (forecast="linear" later loads it).
    (package,) = tmp_path.iterdir()
    assert read_manifest(package).graphs["forecast"].file == "forecast.pt2"

    def no_compile(*args, **kwargs):
        raise WouldCompile

    monkeypatch.setattr(dcfx.builds, "write_export", no_compile)
    # A second runtime (a new process would do the same) loads the packages instead of compiling.
    warm = dcfx.compile(unet, branch=0, interval=2, backend="inductor", dynamic=ranges, cache_dir=tmp_path)
    for size in sizes:
        got = warm(**call_at(unet, *size), timestep=torch.tensor(900)).sample
        torch.testing.assert_close(got, want[size, 900], atol=1e-4, rtol=0)
    # An altered package is refused (its sha256 no longer matches the manifest) and compiled again.
    (package,) = [p for p in tmp_path.rglob("shallow.pt2")]
    package.write_bytes(package.read_bytes() + b"\0")
    altered = dcfx.compile(unet, branch=0, interval=2, backend="inductor", dynamic=ranges, cache_dir=tmp_path)
    with caplog.at_level("WARNING", logger="dcfx.builds"), pytest.raises(WouldCompile):
        altered(**call_at(unet, *sizes[0]), timestep=torch.tensor(900))
    assert "not usable" in caplog.text
    # Other weights make another key: the cached packages of the old ones are never used.
    other = tiny_unet(seed=1)
    stale = dcfx.compile(other, branch=0, interval=2, backend="inductor", dynamic=ranges, cache_dir=tmp_path)
    with pytest.raises(WouldCompile):
        stale(**call_at(other, *sizes[0]), timestep=torch.tensor(900))
