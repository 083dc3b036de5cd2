"""dcfx.zoo.load_unet: the one model loader behind dcfx.tune and every dcfx command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from dcfx.digits import load_model
from dcfx.zoo import check_model, load_unet
from tests.fixtures import tiny_unet
from tests.transformers.tiny import BUILDERS

ROOT = Path(__file__).resolve().parent.parent


def test_the_bundled_model_by_name():
    unet = load_unet("digits")
    assert isinstance(unet, UNet2DConditionModel) and not unet.training
    assert (unet.config.sample_size, unet.config.in_channels) == (16, 1)
    want = load_model().unet.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in unet.state_dict().items())


def test_a_built_in_config_and_a_folder(tmp_path):
    assert load_unet("small-sd").config.block_out_channels == (32, 64, 128, 128)
    tiny_unet(layers_per_block=1).save_pretrained(tmp_path / "pipe" / "unet")
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):  # a pipeline folder or the U-Net's own
        assert load_unet(folder).config.layers_per_block == 1


def test_a_transformer_pipeline_folder(tmp_path):
    tiny = BUILDERS["dit"]()
    tiny.pipe.save_pretrained(tmp_path / "pipe")  # transformer/, vae/, scheduler/ and model_index.json
    want = tiny.transformer.state_dict()
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):  # a pipeline folder or the model's own
        model = load_unet(folder)
        assert type(model).__name__ == "DiTTransformer2DModel" and not model.training
        assert model.state_dict().keys() == want.keys()
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_bad_models_raise_value_errors_naming_the_choices(tmp_path):
    with pytest.raises(
        ValueError, match=r"model 'nope' is neither a built-in model \(digits, digits-dit, sd15, small-sd\)"
    ):
        load_unet("nope")
    with pytest.raises(ValueError, match="neither a built-in model"):
        check_model(tmp_path / "missing")
    check_model(tmp_path)  # an existing folder passes the cheap check; loading it says what is wrong
    with pytest.raises(ValueError, match=r"cannot read .*config\.json"):
        load_unet(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "NotAModel"}')
    with pytest.raises(ValueError, match="'NotAModel', which is not a diffusers model class"):
        load_unet(tmp_path)


def test_importing_dcfx_needs_no_diffusers():
    # A process that only loads exports has no diffusers; dcfx.tune (and the loader it uses) come with dcfx.
    code = "import sys; sys.modules['diffusers'] = None; import dcfx, dcfx.zoo; print(dcfx.tune.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "tune"
