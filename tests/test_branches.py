import pytest
import torch

import dcfx
from dcfx.branches import flop_counts, format_branches, ideal_speedup, ideal_speedup_of_counts
from dcfx.models import spec_for
from dcfx.passes import capture
from tests.fixtures import tiny_ddpm, tiny_sd


@pytest.mark.slow
def test_branches_of_the_sd_layout():
    unet = tiny_sd()
    infos = dcfx.branches(unet, (2, 4, 16, 16))
    assert [b.branch for b in infos] == list(range(9))
    assert [b.up_layer for b in infos[:4]] == [
        "up_blocks.2.resnets.2",
        "up_blocks.2.resnets.1",
        "up_blocks.2.resnets.0",
        "up_blocks.1.resnets.2",
    ]
    shares = [b.flop_share for b in infos]
    assert all(0 < r < 1 for r in shares) and shares == sorted(shares)
    assert infos[0].cache_shape == (2, 8, 16, 16) and infos[3].cache_shape == (2, 16, 8, 8)
    assert infos[0].ideal_speedup[3] == pytest.approx(3 / (1 + 2 * shares[0]))
    assert "mid_block" not in infos[-1].kept_layers and "down_blocks.2.resnets.1" in infos[-1].kept_layers
    table = format_branches(infos)
    assert len(table.splitlines()) == 10 and "N=10" in table


def test_meta_flop_count_agrees_with_real_tensors_and_counts_attention():
    unet = tiny_ddpm()
    (names, tensors), _ = spec_for(unet).flatten(unet, (torch.randn(1, 3, 16, 16), 10), {})
    gm = capture(unet, names, tensors)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        gm(*tensors)
    real = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    meta = flop_counts(gm, *tensors)
    assert meta["aten.convolution"] == real["aten.convolution"] > 0
    assert meta["aten.addmm"] == real["aten.addmm"]
    # QK^T and AV cost 2 * tokens^2 * channels each: 5 attentions at 8x8 (2 down, 3 up), 1 in the mid block at 4x4.
    attention = 5 * 2 * (2 * 64 * 64 * 16) + 2 * (2 * 16 * 16 * 16)
    assert meta["aten.bmm"] == attention + real["aten.mm"]
    assert dcfx.branches(unet, (1, 3, 16, 16))[0].full_flops == sum(meta.values())


def test_ideal_speedup_formula():
    assert ideal_speedup(1, 0.3) == 1
    assert ideal_speedup(5, 0.0) == 5
    assert ideal_speedup(3, 0.061) == pytest.approx(3 / 1.122)
    assert ideal_speedup_of_counts(4, 16, 0.1) == pytest.approx(ideal_speedup(5, 0.1))
    assert ideal_speedup_of_counts(7, 13, 0.1) == pytest.approx(20 / 8.3)  # 20 steps at 1:3
    with pytest.raises(ValueError, match="step counts"):
        ideal_speedup_of_counts(0, 0, 0.1)


def test_bad_sample_shape():
    with pytest.raises(ValueError, match=r"sample shape must be \(batch, 4, height, width\) for UNet2DConditionModel"):
        dcfx.branches(tiny_sd(), (2, 3, 16, 16))
