"""AOTInductor: the graphs as .pt2 packages, run here and in a fresh process without diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx.export.manifest import ArtifactError, read_manifest
from tests.export.conftest import SD_BRANCH, export_sd, forecast_case, sample_loop, sd_unet
from tests.export.fresh import run_fresh

pytestmark = pytest.mark.slow  # three C++ compiles per export (about 2 min here)
ATOL = 1e-4


@pytest.fixture(scope="module")
def aoti_sd(tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "sd"
    return export_sd(out, format="aoti", shapes={"batch": 2, "height": 16, "width": 16})


def test_matches_eager_in_a_fresh_process_without_diffusers(aoti_sd, tmp_path):
    g = torch.Generator().manual_seed(5)
    x, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 8, generator=g)
    outs, stdout = run_fresh(aoti_sd, tmp_path, x, ehs)
    assert stdout.split() == ["ModelOutput", "1", "2"]
    eager = dcfx.compile(sd_unet(), branch=SD_BRANCH, interval=3)
    for got, t in zip(outs, (900, 800, 700), strict=True):
        torch.testing.assert_close(got, eager(x, t, encoder_hidden_states=ehs).sample, atol=1e-4, rtol=0)


def test_packages_and_manifest(aoti_sd):
    manifest = read_manifest(aoti_sd)
    assert manifest.format == "aoti" and manifest.format_data["device"] == "cpu"
    assert {"full.pt2", "shallow.pt2", "forecast.pt2"} <= set(manifest.files)
    assert manifest.graphs["forecast"].file == "forecast.pt2"
    assert manifest.files["shallow.pt2"]["bytes"] < manifest.files["full.pt2"]["bytes"]
    assert manifest.files["forecast.pt2"]["bytes"] < manifest.files["full.pt2"]["bytes"]
    assert max(manifest.checks[f"{g}_max_abs_diff"] for g in ("full", "shallow", "forecast")) < ATOL


def test_forecast_sampling_loop_equals_eager_runtime(aoti_sd):
    x, call = forecast_case()
    scheduler = DDIMScheduler()
    eager = dcfx.compile(sd_unet(), branch=SD_BRANCH, interval=3, forecast="linear", scheduler=scheduler)
    want = sample_loop(eager, scheduler, call, x)
    loaded = dcfx.load(aoti_sd, forecast="linear", scheduler=scheduler)
    got = sample_loop(loaded, scheduler, call, x)
    assert loaded.stats == eager.stats == {"full": 4, "shallow": 6}
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    reuse = sample_loop(dcfx.load(aoti_sd, scheduler=scheduler), scheduler, call, x)
    assert (got - reuse).abs().max() > 100 * ATOL, "forecasting changed nothing: the test would be vacuous"


def test_static_export_refuses_other_sizes(aoti_sd):
    loaded = dcfx.load(aoti_sd)
    with pytest.raises(ValueError, match=r"'sample' dim 2 is 24; the export takes exactly 16 there"):
        loaded(torch.randn(2, 4, 24, 16), 900, encoder_hidden_states=torch.randn(2, 7, 8))


def test_cpu_code_refuses_cuda(aoti_sd):
    with pytest.raises(ArtifactError, match="holds AOTInductor code for cpu; it cannot run on cuda"):
        dcfx.load(aoti_sd, device="cuda")
