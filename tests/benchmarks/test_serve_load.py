"""benchmarks/serve_load.py runs end to end at a toy size and writes a consistent result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_serve_load_smoke(tmp_path):
    args = ["--rates", "20", "--min-requests", "5", "--max-requests", "5", "--warmup-requests", "1"]
    args += ["--steps", "10", "--max-batch", "2", "--variants", "one-at-a-time,dcfx", "--ray-rate", "0"]
    args += ["--forecast", "linear"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve_load.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"one-at-a-time", "dcfx"} and result["ray"] is None
    one, ours = rows["one-at-a-time"], rows["dcfx"]
    assert one["runs"] == ours["runs"] == 2 and one["counted"] == ours["counted"] == 2 * 4  # two runs pooled
    assert one["full_calls"] == 5 * 2 and one["shallow_calls"] == 5 * 8  # per run: steps 0 and 5 of 10 full, 1:5
    # Forecasting: every shallow step after the second full step (steps 6-9) reads a forecast.
    assert one["forecast_calls"] == 5 * 4 and 0 < ours["forecast_calls"] <= ours["shallow_calls"]
    assert one["mean_shallow_rows"] == 1.0 and ours["mean_shallow_rows"] > 1.0  # at 20/s dcfx's requests share calls
    for row in rows.values():
        assert 0 < row["p50_s"] <= row["p99_s"] <= row["max_s"] and row["throughput"] > 0
        assert len(row["load_avg_1m"]) == 2 and 0 < row["core_share"] <= 1.5
    assert "| 20 | dcfx |" in (tmp_path / "serve_load.md").read_text()
    assert "forecast linear" in (tmp_path / "serve_load.md").read_text()
    assert (tmp_path / "serve_load.png").stat().st_size > 0


@pytest.mark.slow
def test_serve_pipeline_load_smoke(tmp_path):
    """The whole-pipeline benchmark: every variant serves every request, dcfx's PNGs match its offline twin's."""
    args = ["--quick", "--loads", "0.5,3", "--steps", "6", "--sample-size", "8", "--cpu", "-1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_pipeline_load.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve_pipeline_load.json").read_text())
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {"diffusers-one-at-a-time", "diffusers-request-batching", "dcfx-one-at-a-time", "dcfx"}
    assert len(result["rows"]) == 2 * 4 and len(result["rates"]) == 2
    for row in result["rows"]:
        assert row["counted"] == 8 and 0 < row["p50_s"] <= row["p99_s"] and row["throughput"] > 0
    shares = dict(result["stage_shares"]["shares"])
    forwards = shares.pop("unet_forwards")  # a part of the U-Net loop's share
    assert abs(sum(shares.values()) - 1) < 0.02 and 0 < forwards <= shares["unet_loop"], shares
    # Served images: the same prompt and seed give the offline pipeline's PNG, within one level.
    for name, c in result["images"].items():
        assert c["images"] == 2 * 10 and c["within_one_level"] == c["images"], (name, c)
    assert "| dcfx |" in (tmp_path / "serve_pipeline_load.md").read_text()
    assert (tmp_path / "serve_pipeline_load.png").stat().st_size > 0
