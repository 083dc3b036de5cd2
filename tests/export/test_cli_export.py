"""``dcfx export`` and ``dcfx inspect`` on the command line."""

from __future__ import annotations

import shutil

import pytest
import torch

import dcfx
from dcfx.cli import main
from tests.export.conftest import sd_unet


@pytest.mark.slow
def test_export_then_inspect(tmp_path, capsys):
    folder = tmp_path / "unet"
    sd_unet().save_pretrained(folder)
    out = tmp_path / "out"
    args = ["--model", str(folder), "--branch", "1", "--interval", "4", "--batch", "2", "--height", "16"]
    code = main(["export", str(out), *args, "--width", "8:16:16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "onnx export of UNet2DConditionModel" in printed and "width 8..16 in multiples of 2" in printed
    loaded = dcfx.load(out)
    assert loaded.deepcache_config.branch == 1 and loaded.deepcache_config.interval == 4
    assert loaded(torch.randn(2, 4, 16, 8), 900, torch.randn(2, 77, 8)).sample.shape == (2, 4, 16, 8)
    assert main(["inspect", str(out)]) == 0
    assert "all sha256 ok" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_reports_a_tampered_export(onnx_sd, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(onnx_sd, copy)
    (copy / "weights.bin").write_bytes(b"\0" * (copy / "weights.bin").stat().st_size)
    assert main(["inspect", str(copy)]) == 1
    assert "weights.bin does not match its sha256" in capsys.readouterr().err


def test_bad_range_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "x"), "--batch", "1:2:3:4"])


@pytest.mark.slow
def test_the_digits_export_covers_the_models_own_generation(tmp_path, capsys):
    from dcfx.digits import DATA_DIR, DEMO_DIGITS, NUM_CLASSES, TOKENS, generate, load_model

    model = load_model()
    out = tmp_path / "digits"
    assert main(["export", str(out), "--model", "digits", "--format", "onnx", "--interval", "3"]) == 0
    printed = capsys.readouterr().out
    assert "onnx export of UNet2DConditionModel" in printed and f"tokens exactly {TOKENS}" in printed
    loaded = dcfx.load(out)
    assert loaded.deepcache_config.interval == 3
    labels = torch.arange(NUM_CLASSES)
    eager = dcfx.compile(model.unet, branch=0, interval=3)
    # The ten digits guided (20 rows), and the demo's 40 guided: 80 rows, run in chunks of 40.
    for digits in (labels, labels.repeat(DEMO_DIGITS // NUM_CLASSES)):
        got = generate(loaded, model.tokens, model.scheduler(), digits, steps=6, guidance=2.0)
        want = generate(eager, model.tokens, model.scheduler(), digits, steps=6, guidance=2.0)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The model's folder by path, other ranges (a prompt length among them); a batch below the
    # range is refused by name.
    small = tmp_path / "small"
    args = ["--model", str(DATA_DIR), "--format", "onnx", "--batch", "2:8", "--tokens", "2:4:8"]
    assert main(["export", str(small), *args]) == 0
    assert "tokens 2..8" in capsys.readouterr().out
    loaded = dcfx.load(small)
    got = generate(loaded, model.tokens, model.scheduler(), labels, steps=3)  # 10 rows: chunks of 5
    torch.testing.assert_close(
        got, generate(eager, model.tokens, model.scheduler(), labels, steps=3), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match=r"dim 0 \(batch\) is 1, outside the exported range 2..8"):
        generate(loaded, model.tokens, model.scheduler(), labels[:1], steps=2)
