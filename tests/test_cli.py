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
