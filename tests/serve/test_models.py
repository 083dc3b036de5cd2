"""What the engine serves: the bundled digits model, or any diffusers U-Net folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from dcfx.serve import DigitsServeModel, GenerationRequest, UNetServeModel, load_serve_model
from tests.fixtures import tiny_sd

ROOT = Path(__file__).resolve().parents[2]


def test_digits_by_name():
    model = load_serve_model("digits")
    assert isinstance(model, DigitsServeModel) and model.gives_images and model.sample_size() == (16, 16)
    prepared = model.prepare(GenerationRequest(labels=(1, 2), guidance=2.0, seed=4))
    assert prepared.rows == 4 and prepared.conditioning["encoder_hidden_states"].shape == (4, 4, 64)
    torch.testing.assert_close(prepared.noise, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4)))


def test_a_diffusers_folder_serves_latents(tmp_path):
    tiny_sd().save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 500, "beta_schedule": "scaled_linear"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    model = load_serve_model(str(tmp_path))
    assert isinstance(model, UNetServeModel) and not model.gives_images
    assert model.scheduler("ddim").config.num_train_timesteps == 500
    with pytest.raises(ValueError, match="gives latents only"):
        model.png(torch.zeros(1, 4, 16, 16))


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither 'digits' nor a diffusers folder"):
        load_serve_model(str(tmp_path))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"conditioning": {"prompt": torch.zeros(1, 4, 8)}}, "takes no input 'prompt'; conditioning inputs: "),
        ({"conditioning": {"encoder_hidden_states": torch.zeros(1, 4, 8)}, "guidance": 3.0}, "needs negative_con"),
        ({"labels": (1,)}, "takes conditioning tensors, not labels"),
    ],
)
def test_bad_conditioning_names_what_is_wrong(fields, match):
    model = UNetServeModel(tiny_sd(), DDIMScheduler().config, name="tiny")
    with pytest.raises(ValueError, match=match):
        model.prepare(GenerationRequest(**fields))


def test_the_engine_imports_no_ray():
    code = "import sys, dcfx.serve; sys.exit(int('ray' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
