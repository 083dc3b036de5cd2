import pytest

from dcfx.cli import main


def test_branches_command_prints_every_branch(capsys):
    assert main(["branches", "--model", "small-sd", "--size", "8", "--layers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["branch", "up", "layer", "cache"]
    assert len([line for line in out if line.strip().split(" ")[0].isdigit()]) == 12
    assert out[1].split()[1] == "up_blocks.3.resnets.2"
    assert any(line.startswith("branch 0: time_proj") for line in out)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="neither a built-in config"):
        main(["branches", "--model", "no-such-model"])


def test_demo_runs_and_reports_the_speedup(capsys):
    assert main(["demo", "--steps", "4", "--interval", "2", "--repeats", "1", "--size", "8"]) == 0
    out = capsys.readouterr().out
    assert "max abs difference 0.0e+00" in out
    assert "steps run by dcfx: 2 full, 2 shallow" in out
    assert "speedup" in out and "FLOP-ideal" in out
