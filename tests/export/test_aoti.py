"""AOTInductor: both graphs as .pt2 packages, run here and in a fresh process without diffusers."""

from __future__ import annotations

import pytest
import torch

import dcfx
from dcfx.export.manifest import ArtifactError, read_manifest
from tests.export.conftest import SD_BRANCH, export_sd, sd_unet
from tests.export.fresh import run_fresh

pytestmark = pytest.mark.slow  # two C++ compiles (about 90 s here)


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
    assert {"full.pt2", "shallow.pt2"} <= set(manifest.files)
    assert manifest.files["shallow.pt2"]["bytes"] < manifest.files["full.pt2"]["bytes"]
    assert manifest.checks["full_max_abs_diff"] < 1e-4 and manifest.checks["shallow_max_abs_diff"] < 1e-4


def test_static_export_refuses_other_sizes(aoti_sd):
    loaded = dcfx.load(aoti_sd)
    with pytest.raises(ValueError, match=r"'sample' dim 2 is 24; the export takes exactly 16 there"):
        loaded(torch.randn(2, 4, 24, 16), 900, encoder_hidden_states=torch.randn(2, 7, 8))


def test_cpu_code_refuses_cuda(aoti_sd):
    with pytest.raises(ArtifactError, match="holds AOTInductor code for cpu; it cannot run on cuda"):
        dcfx.load(aoti_sd, device="cuda")
