"""Layouts beyond the image U-Nets: SVD's video U-Net, and the models dcfx refuses (and why)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DiTTransformer2DModel

import dcfx
from dcfx.cli import main
from tests.pipelines.builders import SVD_FRAMES, tiny_svd_unet


@pytest.fixture(scope="module")
def svd_unet():
    return tiny_svd_unet()


@pytest.mark.slow
def test_svd_branches_follow_the_video_layout(svd_unet):
    infos = dcfx.branches(svd_unet)  # default: batch 2, config's num_frames and sample_size
    # Frames fold into the batch inside the U-Net: the cache holds batch x frames rows.
    assert infos[0].cache_shape == (2 * SVD_FRAMES, 32, 16, 16)
    assert [b.up_layer for b in infos[:3]] == [f"up_blocks.1.resnets.{i}" for i in (2, 1, 0)]
    shares = [b.flop_share for b in infos]
    assert shares == sorted(shares) and 0 < shares[0] < 0.2
    with pytest.raises(ValueError, match=r"sample shape must be \(batch, frames, 8, height, width\)"):
        dcfx.branches(svd_unet, (2, 8, 16, 16))


def test_svd_shallow_step_reuses_the_feature_exactly(svd_unet):
    g = torch.Generator().manual_seed(0)
    call = {
        "sample": torch.randn(2, SVD_FRAMES, 8, 16, 16, generator=g),
        "timestep": torch.tensor(0.7),
        "encoder_hidden_states": torch.randn(2, 1, 32, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2),
    }
    with torch.no_grad():
        want = svd_unet(**call).sample
    # A two-call "sampler" at one timestep: the second call is step 1, a shallow step, on the
    # same input, so the cached feature is exactly the one its full graph would compute.
    scheduler = SimpleNamespace(timesteps=torch.tensor([0.7, 0.7]))
    fast = dcfx.compile(svd_unet, branch=1, interval=2, scheduler=scheduler)
    full = fast(**call).sample
    shallow = fast(**call).sample
    assert fast.stats == {"full": 1, "shallow": 1}
    torch.testing.assert_close(full, want, atol=0, rtol=0)
    torch.testing.assert_close(shallow, want, atol=1e-6, rtol=0)


def test_svd_export_is_refused_before_any_work(svd_unet, tmp_path):
    with pytest.raises(TypeError, match=r"image U-Nets.*\(batch, frames, channels, height, width\).*dcfx.compile"):
        dcfx.export(svd_unet, tmp_path / "svd", branch=0, progress=False)
    assert not (tmp_path / "svd").exists()


@pytest.mark.slow
def test_branches_cli_reads_the_class_from_a_folder(svd_unet, tmp_path, capsys):
    svd_unet.save_pretrained(tmp_path / "unet")
    assert main(["branches", "--model", str(tmp_path), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "up_blocks.1.resnets.2" in out and f"[{2 * SVD_FRAMES}, 32, 16, 16]" in out


def test_a_folder_of_another_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "NotAModel"}')
    with pytest.raises(SystemExit, match="'NotAModel', which is not a diffusers model class"):
        main(["branches", "--model", str(tmp_path)])


def test_a_transformer_with_one_block_has_nothing_to_cache():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=1, sample_size=8, norm_num_groups=1
    )
    with pytest.raises(ValueError, match="leave no block to cache: this model has 1 blocks"):
        dcfx.compile(dit)


def test_a_transformer_without_block_lists_is_told_what_dcfx_cuts():
    class MyTransformer2DModel(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return hidden_states

    with pytest.raises(
        TypeError, match="dcfx cuts transformers by their blocks: module lists named transformer_blocks"
    ):
        dcfx.compile(MyTransformer2DModel())


def test_a_custom_unet_is_told_what_layout_is_needed():
    class MyUNet(torch.nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(TypeError, match=r"MyUNet.*up_blocks\[i\]\.resnets\[j\].*register_model"):
        dcfx.compile(MyUNet())
