"""``dcfx export`` and ``dcfx inspect`` on the command line."""

from __future__ import annotations

import shutil

import pytest
import torch

import dcfx
from dcfx.cli import main
from tests.export.conftest import sd_unet


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


def test_inspect_reports_a_tampered_export(onnx_sd, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(onnx_sd, copy)
    (copy / "weights.bin").write_bytes(b"\0" * (copy / "weights.bin").stat().st_size)
    assert main(["inspect", str(copy)]) == 1
    assert "weights.bin does not match its sha256" in capsys.readouterr().err


def test_bad_range_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "x"), "--batch", "1:2:3:4"])
