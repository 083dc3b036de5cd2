"""dcfx.tune: candidates and the cost model, the frontier, the choice, the cache, the outputs.

Latencies are measured, so nothing here asserts a speed; the choice is checked against the
numbers the tuner measured, and the tuner's runs against fresh ones (eager: exactly equal images).
"""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx import cli
from dcfx.tune import Goal, Measurement, Rounds, Workload, candidates, choose, measure, median_spread, pareto, tune
from dcfx.tune.report import NO_PLOT
from tests.fixtures import tiny_unet


def m(latency, quality, branch=0, interval=2):
    return Measurement(
        {"branch": branch, "interval": interval, "schedule": "uniform"}, 1, 0.1, 1.0, latency, [], quality
    )


def test_pareto_keeps_what_nothing_beats_on_both():
    points = [m(1.0, 30), m(2.0, 35), m(1.5, 29), m(3.0, 34), m(0.5, 20), m(2.5, 40)]
    front = pareto(points)
    assert [(p.latency_s, p.psnr_db) for p in front] == [(0.5, 20), (1.0, 30), (2.0, 35), (2.5, 40)]
    for p in points:
        if p not in front:
            assert any(q.latency_s <= p.latency_s and q.psnr_db >= p.psnr_db for q in front)


def test_choose_for_each_goal():
    points = [m(1.0, 30), m(2.0, 35), m(0.5, 20), m(2.5, 40)]
    assert choose(points, Goal("latency", 2.1), baseline_s=10).psnr_db == 35
    assert choose(points, Goal("speedup", 5), baseline_s=10).psnr_db == 35  # budget 2 s
    assert choose(points, Goal("quality", 33), baseline_s=10).latency_s == 2.0
    assert choose(points, Goal("latency", 0.1), baseline_s=10) is None
    assert choose(points, Goal("quality", 50), baseline_s=10) is None


@pytest.mark.parametrize(
    ("kind", "value", "match"),
    [
        ("throughput", 2, "unknown goal 'throughput'; valid: latency, speedup, quality"),
        ("latency", 0, "must be a number > 0, got 0"),
        ("quality", "high", "must be a number > 0, got 'high'"),
        ("speedup", 1.0, r"a speedup goal must be > 1 \(1 is no cache\), got 1.0"),
    ],
)
def test_bad_goals(kind, value, match):
    with pytest.raises(ValueError, match=match):
        Goal(kind, value)


def test_candidates_predict_from_flop_shares_and_skip_schedules_without_solution():
    pool, infeasible = candidates({0: 0.1, 3: 0.5}, 10, [2, 5], ["uniform", "non-uniform"], 2.0, center=5, power=1.4)
    by = {(c.config.branch, c.config.interval, c.config.schedule): c for c in pool}
    uniform = by[(0, 5, "uniform")]  # 2 full + 8 shallow of 10
    assert uniform.full_steps == 2 and uniform.predicted_s == pytest.approx(2.0 * (2 + 8 * 0.1) / 10)
    assert uniform.ideal_speedup == pytest.approx(10 / (2 + 0.8))
    assert infeasible == 2  # non-uniform at N=2, centre 5 of 10 steps has no solution (both branches)
    assert by[(3, 5, "non-uniform")].config.steps == 10  # the step count rides along for load without a scheduler
    assert len(pool) == 6


class TinyWorkload(Workload):
    """A tiny random U-Net with random conditioning: seconds per sweep."""

    def __init__(self):
        self.name = "tiny"
        self.unet = tiny_unet(layers_per_block=1)

    def scheduler(self):
        return DDIMScheduler()

    def inputs(self, seeds, size):
        noise = torch.stack([torch.randn(4, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        states = torch.stack([torch.randn(7, 8, generator=torch.Generator().manual_seed(100 + s)) for s in seeds])
        return noise, {"encoder_hidden_states": states}

    def describe(self):
        return {"model": "tiny", "scheduler": "ddim"}


@pytest.fixture(scope="module")
def tiny_work():
    return TinyWorkload()


def test_tune_measures_chooses_checks_and_caches(tiny_work, tmp_path):
    options = {
        "steps": 6,
        "batch": 1,
        "size": 8,
        "seeds": 2,
        "repeats": 2,
        "max_rounds": 4,
        "tolerance": 0.5,
        "branches": (0, 2),
        "intervals": (2, 3),
        "schedules": ("uniform", "non-uniform"),
        "center": 2,
        "quality": 1.0,  # every configuration meets it: the fastest is chosen
        "out": tmp_path,
        "progress": False,
        "log": lambda msg: None,
    }
    result = tune(tiny_work, **options)
    assert result.counts["measured"] >= 1 and result.counts["cached"] == 0
    fastest = min(result.measurements, key=lambda p: p.latency_s)
    assert result.chosen is fastest
    assert result.frontier[0] is fastest
    # The written config is what dcfx.compile and dcfx.export read.
    cfg = dcfx.DeepCacheConfig.load(tmp_path / "config.json")
    assert cfg.to_dict() == result.chosen.config
    assert dcfx.compile(tiny_work.unet, config=tmp_path / "config.json").deepcache_config == cfg
    # The fresh rerun from config.json gives the tuner's images exactly (eager), so the same PSNR.
    assert result.check["psnr_db"] == pytest.approx(result.chosen.psnr_db, abs=1e-6)
    assert result.check["config_file"] == str(tmp_path / "config.json")
    for name in ("report.md", "pareto.png", "results.json", "cache.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["chosen"] == result.chosen.config and len(saved["measurements"]) == len(result.measurements)
    report = (tmp_path / "report.md").read_text()
    assert "Pareto frontier" in report and "![Pareto frontier](pareto.png)" in report
    assert result.written == ["config.json", "results.json", "report.md", "pareto.png"]
    # Latencies come from interleaved rounds: 2 to 4 timed runs each, the spread of each median beside it.
    assert saved["rounds"] == {"min_rounds": 2, "max_rounds": 4, "tolerance": 0.5}
    for p, row in zip(result.measurements, saved["measurements"], strict=True):
        assert 2 <= len(p.times_s) <= 4 and p.latency_s == statistics.median(p.times_s)
        assert p.spread == row["spread"] == pytest.approx(median_spread(p.times_s))
        assert f"| {p.latency_s:.3f} | {p.spread:.1%} |" in report
    settled = sum(Rounds(2, 4, 0.5).settled(p.times_s) for p in result.measurements)
    assert result.counts["unsettled"] == len(result.measurements) - settled
    assert 2 <= result.counts["rounds"] <= 4
    assert "in interleaved rounds, until its spread" in report
    assert result.check["spread"] == pytest.approx(median_spread(result.check["times_s"]))
    assert len(result.check["times_s"]) >= 5  # the check runs more than any candidate
    # Every quality is PSNR against no cache: caching changed the images, so it is finite and positive.
    assert all(0 < p.psnr_db < 100 for p in result.measurements)

    again = tune(tiny_work, **{**options, "verify": False})
    assert again.counts["measured"] == 0 and again.counts["cached"] == len(again.measurements)
    assert [p.config for p in again.measurements] == [p.config for p in result.measurements]
    assert [p.latency_s for p in again.measurements] == [p.latency_s for p in result.measurements]
    assert [p.spread for p in again.measurements] == [p.spread for p in result.measurements]


def test_without_matplotlib_tune_says_so_first_and_writes_all_but_the_plot(tiny_work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    messages = []
    result = tune(
        tiny_work,
        steps=4,
        batch=1,
        size=8,
        seeds=1,
        repeats=1,
        max_rounds=1,
        branches=(0,),
        intervals=(2,),
        schedules=("uniform",),
        min_speedup=1.0,
        verify=False,
        out=tmp_path,
        progress=False,
        log=messages.append,
    )
    assert messages[0] == f"dcfx tune: {NO_PLOT}"  # before anything is measured
    assert messages[1].startswith("dcfx tune: no-cache reference")
    assert sum(NO_PLOT in m for m in messages) == 2  # and again at the end, where the user looks
    assert not (tmp_path / "pareto.png").exists()
    assert "pareto.png" not in result.written and "results.json" in result.written
    report = (tmp_path / "report.md").read_text()
    assert "(no plot: matplotlib is not installed" in report and "](pareto.png)" not in report
    assert json.loads((tmp_path / "results.json").read_text())["measurements"]


def test_the_baseline_is_timed_beside_the_candidates_and_the_check(tiny_work, tmp_path, monkeypatch):
    calls = []

    def spy(runs, rounds, **kwargs):
        timings = measure.time_interleaved(runs, rounds, **kwargs)
        calls.append({key: len(t.times_s) for key, t in timings.items()})
        return timings

    monkeypatch.setattr(sys.modules["dcfx.tune"], "time_interleaved", spy)  # dcfx.tune is the function
    result = tune(
        tiny_work,
        **{"steps": 4, "batch": 1, "size": 8, "seeds": 1, "repeats": 2, "max_rounds": 3, "branches": (0,)},
        **{"intervals": (2, 3), "schedules": ("uniform",), "min_speedup": 1.0, "quality": 1.0},
        **{"out": tmp_path, "progress": False, "log": lambda msg: None},
    )
    keys = {json.dumps({"branch": 0, "interval": n, "schedule": "uniform"}, sort_keys=True) for n in (2, 3)}
    # First the cost model's unit and a first baseline; then the candidates, with the baseline again; then the check.
    assert [set(c) for c in calls] == [{"baseline", "all-full"}, {"baseline", *keys}, {"baseline", "check"}]
    cached = json.loads((tmp_path / "cache.json").read_text())
    baseline = next(v for k, v in cached.items() if k.endswith(":baseline"))
    assert len(baseline["times_s"]) == calls[1]["baseline"]  # the one timed beside the candidates is kept
    assert result.baseline_s == baseline["latency_s"] == statistics.median(baseline["times_s"])
    assert result.baseline_spread == pytest.approx(median_spread(baseline["times_s"]))
    assert result.check["speedup"] == pytest.approx(result.check["baseline_s"] / result.check["latency_s"])


def test_a_latency_goal_prunes_before_measuring(tiny_work, tmp_path):
    result = tune(
        tiny_work,
        steps=4,
        batch=1,
        size=8,
        seeds=1,
        repeats=1,
        branches=(0,),
        intervals=(2, 3),
        schedules=("uniform",),
        latency=1e-9,  # no configuration can meet it
        out=tmp_path,
        progress=False,
        log=lambda msg: None,
    )
    assert result.counts["pruned"] == result.counts["candidates"] == 2
    assert result.counts["measured"] == 0 and result.chosen is None
    assert not (tmp_path / "config.json").exists() and (tmp_path / "report.md").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency": 1.0, "quality": 30}, r"give one goal .* got \['latency', 'quality'\]"),
        ({"intervals": (1, 2)}, r"intervals must be ints >= 2 \(1 is no cache\), got \[1, 2\]"),
        ({"schedules": ("window",)}, "schedules must be among uniform, non-uniform"),
        ({"steps": 1}, "steps must be an int >= 2, got 1"),
        ({"repeats": 3, "max_rounds": 2}, r"max_rounds \(2\) must be >= repeats \(3\)"),
        ({"tolerance": 0.0}, r"tolerance must be a number in \(0, 1\) \(a relative spread, 0.03 = 3%\), got 0.0"),
        ({"seeds": 5, "batch": 2}, r"seeds \(5\) must be a multiple of batch \(2\)"),
        ({"backend": "tvm"}, "unknown backend 'tvm'"),
        ({"branches": (0, 9)}, r"branches \[9\] are not branches of this model; valid: 0\.\.3"),
    ],
)
def test_bad_arguments(tiny_work, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(tiny_work, out=tmp_path, progress=False, log=lambda msg: None, **kwargs)


def test_cli_on_a_diffusers_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_unet(layers_per_block=1).save_pretrained(folder / "unet")
    out = tmp_path / "out"
    code = cli.main(
        [
            "tune",
            *("--model", str(folder), "--steps", "4", "--batch", "1", "--size", "8", "--seeds", "1"),
            *("--branches", "0", "--intervals", "2-3", "--schedules", "uniform", "--repeats", "1"),
            *("--speedup", "1.01", "--out", str(out)),
        ]
    )
    printed = capsys.readouterr()
    assert "Pareto frontier" in printed.err and "report.md, pareto.png" in printed.out
    data = json.loads((out / "results.json").read_text())
    assert data["workload"]["model_class"] == "UNet2DConditionModel" and data["workload"]["steps"] == 4
    assert code == (0 if data["chosen"] else 1)  # exit status 1 when nothing meets the goal
