import re

import pytest
from PIL import Image

from dcfx.cli import main


@pytest.mark.slow
def test_branches_command_prints_every_branch(capsys):
    assert main(["branches", "--model", "small-sd", "--size", "8", "--layers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["branch", "up", "layer", "cache"]
    assert len([line for line in out if line.strip().split(" ")[0].isdigit()]) == 12
    assert out[1].split()[1] == "up_blocks.3.resnets.2"
    assert any(line.startswith("branch 0: time_proj") for line in out)


@pytest.mark.parametrize("command", [["branches"], ["export", "out"], ["tune"]])
def test_unknown_model_is_a_clear_error_in_every_command(command):
    with pytest.raises(SystemExit, match=r"dcfx: --model: model 'no-such-model' is neither a built-in model \(digits"):
        main([*command, "--model", "no-such-model"])


def test_demo_on_the_bundled_model_reports_speed_and_quality(capsys, tmp_path):
    png = tmp_path / "demo.png"
    args = ["demo", "--steps", "6", "--interval", "3", "--per-class", "1", "--repeats", "1", "--out", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "10 digits, 6 DDIM steps" in out
    assert "(2 full + 4 shallow steps, r = 0." in out
    assert re.search(r"speedup \d+\.\d\dx; FLOP-ideal \d+\.\d\dx", out)
    assert re.search(r"PSNR \d+\.\d dB", out)
    assert re.search(r"no cache \d+\.\d%, dcfx \d+\.\d%", out)
    with Image.open(png) as image:  # two panels of one row of ten 16x16 digits, 4x enlarged
        assert image.size == (2 * (10 * 17 + 1) * 4 + 12, (17 + 1) * 4 + 16)


@pytest.mark.slow
def test_demo_rejects_a_bad_branch(tmp_path):
    with pytest.raises(ValueError, match=r"valid: 0\.\.8"):
        main(["demo", "--branch", "9", "--steps", "2", "--per-class", "1", "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--forecast", "none,bogus"], "dcfx serve: unknown forecast 'bogus'; registered: linear, none"),
        (["--interval", "3,0"], "dcfx serve: interval must be an int >= 1, got 0"),
    ],
)
def test_serve_refuses_bad_settings_before_starting_anything(flags, message):
    pytest.importorskip("ray.serve", reason="the serve extra")
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["serve", *flags])


def test_serve_options_offer_every_interval_forecast_pair_on_a_forecasting_runtime():
    pytest.importorskip("ray.serve", reason="the serve extra")
    from dcfx.serve.options import ServeOptions

    options = ServeOptions(interval=(3, 5), forecast=("none", "linear"))
    assert [(c.interval, c.forecast) for c in options.choices()] == [
        (3, "none"),
        (3, "linear"),
        (5, "none"),
        (5, "linear"),
    ]
    # The runtime is built with the first forecasting setting: its graphs include the forecast graph.
    assert (options.deepcache_config().interval, options.deepcache_config().forecast) == (3, "linear")
    assert ServeOptions(interval=5).deepcache_config().forecast == "none"
