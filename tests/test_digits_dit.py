"""The bundled digits transformer: shipped, small, trained, deterministic under dcfx, and demoed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from PIL import Image

import dcfx
from dcfx.cli import main
from dcfx.digits import NUM_CLASSES, load_classifier
from dcfx.digits_dit import DATA_DIR, generate, load_model
from dcfx.models import TransformerSpec, spec_for
from dcfx.zoo import load_unet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_the_shipped_files_are_small_enough_to_ship():
    sizes = {p.relative_to(DATA_DIR).as_posix(): p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file()}
    assert {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= set(sizes)
    assert "scheduler/scheduler_config.json" in sizes and "train_log.json" in sizes
    assert sum(sizes.values()) <= 4 * 2**20, sizes


def test_loaded_by_name_as_a_class_conditional_dit(model):
    transformer = load_unet("digits-dit")
    assert isinstance(transformer, DiTTransformer2DModel) and not transformer.training
    assert isinstance(spec_for(transformer), TransformerSpec)
    config = transformer.config
    assert (config.sample_size, config.in_channels, config.num_embeds_ada_norm) == (16, 1, NUM_CLASSES)
    assert len(spec_for(transformer).blocks(transformer)) >= 6  # enough blocks for block ranges to mean something
    want = model.transformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in transformer.state_dict().items())


def test_the_shipped_model_is_trained(model):
    # Random weights draw noise that the classifier reads at chance (about 10%).
    classifier, _, _ = load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat(2)
    images = generate(model.transformer, model.scheduler(), labels, steps=25)
    with torch.no_grad():
        assert (classifier(images).argmax(1) == labels).float().mean() >= 0.7


def test_generation_with_and_without_caching_is_deterministic(model):
    labels = torch.tensor([0, 3, 7, 9])
    scheduler = model.scheduler()
    plain = generate(model.transformer, scheduler, labels, steps=9, seed=2)
    assert torch.equal(plain, generate(model.transformer, scheduler, labels, steps=9, seed=2))
    assert plain.shape == (4, 1, 16, 16) and plain.abs().max() <= 1

    fast = dcfx.compile(model.transformer, first=2, last=1, interval=3, scheduler=scheduler)
    cached = generate(fast, scheduler, labels, steps=9, seed=2)
    assert fast.stats == {"full": 3, "shallow": 6}
    assert torch.equal(cached, generate(fast, scheduler, labels, steps=9, seed=2))  # back to back: the same
    every_step = generate(fast.reschedule(interval=1), scheduler, labels, steps=9, seed=2)
    torch.testing.assert_close(every_step, plain, atol=1e-5, rtol=0)  # no cached step: the plain images
    assert torch.equal(cached, generate(fast.reschedule(interval=3), scheduler, labels, steps=9, seed=2))
    assert (cached - plain).abs().max() > 1e-3  # caching changed the images
    assert (cached - plain).abs().mean() < 0.1  # and kept them close


def test_guidance_doubles_the_batch_with_the_null_class(model):
    seen = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    try:
        generate(model.transformer, model.scheduler(), torch.tensor([4, 5]), steps=2, guidance=2.0)
    finally:
        handle.remove()
    assert seen == [[4, 5, NUM_CLASSES, NUM_CLASSES]] * 2


def test_the_demo_runs_end_to_end(capsys, tmp_path):
    png = tmp_path / "demo.png"
    args = ["demo", "--model", "digits-dit", "--steps", "6", "--interval", "3", "--per-class", "1"]
    assert main([*args, "--repeats", "1", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "bundled digits-dit model, 10 digits, 6 DDIM steps" in out
    assert "dcfx eager, first 1, last 0, 1:3 uniform" in out
    assert "(2 full + 4 shallow steps, r = 0." in out
    assert re.search(r"speedup \d+\.\d\dx; FLOP-ideal \d+\.\d\dx", out)
    assert re.search(r"PSNR \d+\.\d dB", out) and re.search(r"no cache \d+\.\d%, dcfx \d+\.\d%", out)
    with Image.open(png) as image:  # two panels of one row of ten 16x16 digits, 4x enlarged
        assert image.size == (2 * (10 * 17 + 1) * 4 + 12, (17 + 1) * 4 + 16)


def test_the_demo_refuses_the_other_models_cut(tmp_path):
    common = ["--steps", "2", "--per-class", "1", "--out", str(tmp_path / "x.png")]
    with pytest.raises(ValueError, match="cut at a block range"):
        main(["demo", "--model", "digits-dit", "--branch", "0", *common])
    with pytest.raises(ValueError, match="cut at a skip branch"):
        main(["demo", "--model", "digits", "--first", "1", *common])
    with pytest.raises(ValueError, match=r"first=5, last=3 is out of range for digits-dit \(8 blocks\)"):
        main(["demo", "--model", "digits-dit", "--first", "5", "--last", "3", *common])


def test_a_missing_model_names_the_script_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_digits_dit\.py"):
        load_model(tmp_path)


def run_script(name: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_the_training_script_writes_a_loadable_model(tmp_path):
    run_script("train_digits_dit.py", "--steps", "3", "--batch", "4", "--warmup", "1", "--out", str(tmp_path))
    trained = load_model(tmp_path)
    assert json.loads((tmp_path / "train_log.json").read_text())["settings"]["steps"] == 3
    assert generate(trained.transformer, trained.scheduler(), torch.tensor([1, 7]), steps=2).shape == (2, 1, 16, 16)


@pytest.mark.slow
def test_the_quality_benchmark_runs_on_the_transformer(tmp_path):
    run_script(
        "quality.py",
        *("--model", "digits-dit", "--per-class", "1", "--steps", "6", "--intervals", "3", "--cuts", "F2B1"),
        *("--schedules", "uniform", "--grids", "F2B1:3", "--out", str(tmp_path)),
    )
    rows = json.loads((tmp_path / "quality_dit.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["no cache", "dcfx uniform", "dcfx uniform + forecast", "fewer steps"]
    base, reuse, forecast, fewer = rows
    assert "psnr" not in base and 0 <= base["accuracy"] <= 1 and base["fd"] > 0
    assert (reuse["first"], reuse["last"], reuse["cut"]) == (2, 1, "F2B1") and reuse["full_steps"] == 2
    assert forecast["forecast"] == "linear" and forecast["psnr"] != reuse["psnr"]
    assert fewer["steps"] == round(2 + 4 * reuse["r"])
    table = (tmp_path / "quality_dit.md").read_text()
    assert "bundled digits transformer" in table and "| F2B1 (" in table
    assert (tmp_path / "quality_dit.png").stat().st_size > 0 and (tmp_path / "grid_ddim6_F2B1_n3.png").stat().st_size
