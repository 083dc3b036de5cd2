"""The ``dcfx`` command on a diffusion transformer folder: branches (block ranges), tune, export, serve options.

Where a U-Net command takes ``--branch``, a transformer's takes ``--first``/``--last``; a mix
is refused by name.
"""

from __future__ import annotations

import json

import pytest

from dcfx import DeepCacheConfig
from dcfx.cli import build_parser, main
from tests.transformers.tiny import BUILDERS


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A tiny SD3 transformer saved with save_pretrained (the model's own folder)."""
    folder = tmp_path_factory.mktemp("sd3")
    BUILDERS["sd3"]().transformer.save_pretrained(folder)
    return folder


def test_branches_lists_every_block_range(sd3_folder, capsys):
    assert main(["branches", "--model", str(sd3_folder), "--size", "8", "--layers"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0].split()[:3] == ["first", "last", "cached"] and "sample [2, 4, 8, 8]" in printed.err
    rows = [line.split()[:2] for line in lines[1:11]]
    assert rows == [[str(f), str(b)] for f in range(4) for b in range(4 - f)]  # 4 blocks: 10 ranges
    assert "first 1 last 1: cached transformer_blocks.1, transformer_blocks.2" in lines


def test_branches_finds_a_pipeline_folders_transformer(tmp_path, capsys):
    BUILDERS["flux"]().transformer.save_pretrained(tmp_path / "transformer")
    assert main(["branches", "--model", str(tmp_path), "--size", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "single_transformer_blocks.1 (4)" in out[1]  # Flux: double-stream, then single-stream blocks


@pytest.mark.slow  # a sweep, as tests/tune/test_tune_transformer.py's fast one; the flags' refusals stay fast
def test_tune_searches_first_and_last(sd3_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "tune",
            *("--model", str(sd3_folder), "--scheduler", "flow", "--steps", "4", "--batch", "1", "--size", "8"),
            *("--seeds", "1", "--first", "1,2", "--last", "0", "--intervals", "2", "--schedules", "uniform"),
            *("--forecasts", "none", "--repeats", "1", "--min-speedup", "1.0", "--latency", "1000"),
            *("--out", str(out), "--no-verify"),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0 and "| blocks | N |" in printed.err
    data = json.loads((out / "results.json").read_text())
    assert sorted((m["config"]["first"], m["config"]["last"]) for m in data["measurements"]) == [(1, 0), (2, 0)]
    assert DeepCacheConfig.load(out / "config.json").blocks in {(1, 0), (2, 0)}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--branches", "0", "--first", "1"], "branches=[0] and first=/last= given together"),
        (["--branches", "0"], "branches=[0] names U-Net skip branches"),
        (["--first", "3", "--last", "1"], "leave no block to cache on this model of 4 blocks"),
    ],
)
def test_tune_refuses_the_wrong_knob_before_measuring(sd3_folder, tmp_path, capsys, flags, message):
    code = main(["tune", "--model", str(sd3_folder), "--size", "8", *flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "cache.json").exists()


def test_tune_refuses_first_and_last_on_a_unet(tmp_path, capsys):
    code = main(["tune", "--model", "small-sd", "--first", "1", "--size", "8", "--out", str(tmp_path / "out")])
    assert code == 2 and "this model is a U-Net, cut at a skip branch" in capsys.readouterr().err


@pytest.mark.slow  # an ONNX export (20 s): exports are in the slow tier (test_export.py)
def test_export_takes_first_and_last(sd3_folder, tmp_path, capsys):
    out = tmp_path / "export"
    args = ["export", str(out), "--model", str(sd3_folder), "--first", "1", "--last", "1", "--interval", "2"]
    assert main([*args, "--batch", "1", "--height", "8", "--width", "8", "--tokens", "8", "--format", "onnx"]) == 0
    assert "deepcache: {'interval': 2, 'schedule': 'uniform', 'first': 1, 'last': 1}" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["export", "out"], ["serve"]])
def test_branch_with_first_or_last_is_refused_by_name(command):
    with pytest.raises(SystemExit, match=r"--branch and --first/--last given together: --branch cuts a U-Net"):
        main([*command, "--branch", "0", "--last", "1"])


def test_serve_options_take_first_and_last():
    from dcfx.cli import cut_fields

    args = build_parser().parse_args(["serve", "--first", "2", "--last", "1"])
    assert cut_fields("serve", args.branch, args.first, args.last) == {"first": 2, "last": 1}
    args = build_parser().parse_args(["serve"])
    assert cut_fields("serve", args.branch, args.first, args.last) == {}
