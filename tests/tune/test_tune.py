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
from dcfx.forecast import available_forecasts
from dcfx.tune import (
    PSNR_CAP,
    Goal,
    Measurement,
    Rounds,
    Workload,
    candidates,
    choose,
    fidelity,
    generate,
    load_workload,
    measure,
    median_spread,
    pareto,
    summary,
    tune,
)
from dcfx.tune.report import NO_PLOT
from tests.fixtures import tiny_unet


def m(latency, quality, branch=0, interval=2):
    return Measurement(
        {"branch": branch, "interval": interval, "schedule": "uniform"}, 10, 1, 0.1, 1.0, latency, [], quality
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
    assert {c.config.forecast for c in pool} == {"none"} and {c.steps for c in pool} == {10}  # the defaults


def test_candidates_join_forecast_modes_and_step_counts():
    shares = {0: 0.1, 3: 0.5}
    pool, infeasible = candidates(
        shares, 10, [2, 5], ["uniform"], 2.0, center=5, power=1.4, forecasts=("none", "linear"), step_counts=(10, 6)
    )
    by = {(c.steps, c.config.branch, c.config.interval, c.config.forecast): c for c in pool}
    # Per step count: branch x interval x forecast, and no cache below the reference's 10 steps.
    assert len(pool) == 2 * 2 * 2 + (2 * 2 * 2 + 1) and infeasible == 0
    for k in (10, 6):
        for b in shares:
            for n in (2, 5):
                reuse, forecast = by[(k, b, n, "none")], by[(k, b, n, "linear")]
                # Same FLOPs, so the same prediction: only the measurement tells them apart.
                assert forecast.predicted_s == reuse.predicted_s and forecast.full_steps == reuse.full_steps
                assert forecast.key != reuse.key
    plain = [c for c in pool if not c.caches]
    assert [(c.steps, c.config.interval, c.full_steps, c.flop_share) for c in plain] == [(6, 1, 6, 1.0)]
    assert plain[0].predicted_s == pytest.approx(2.0 * 6 / 10) and plain[0].ideal_speedup == pytest.approx(10 / 6)
    # At 6 steps 1:5 has 2 full steps (0, 5); the ideal speedup is over the 10-step reference.
    fewer = by[(6, 0, 5, "none")]
    assert fewer.full_steps == 2 and fewer.predicted_s == pytest.approx(2.0 * (2 + 4 * 0.1) / 10)
    assert fewer.ideal_speedup == pytest.approx(10 / (2 + 4 * 0.1))
    # The step count joins the cache key only off the reference, so older caches stay valid.
    assert json.loads(by[(10, 0, 2, "none")].key) == {"branch": 0, "interval": 2, "schedule": "uniform"}
    assert json.loads(fewer.key)["sampling_steps"] == 6 and json.loads(plain[0].key) == {
        "interval": 1,
        "sampling_steps": 6,
    }
    assert len({c.key for c in pool}) == len(pool)
    # The non-uniform centre (5 of 10) is scaled to each step count (3 of 6).
    nonuniform, _ = candidates({0: 0.1}, 10, [3], ["non-uniform"], 2.0, center=5, power=1.4, step_counts=(6,))
    assert [(c.config.center, c.config.steps) for c in nonuniform if c.caches] == [(3, 6)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"forecasts": ("quadratic",)},
            r"forecasts must be among the registered modes linear, none; got \['quadratic'\]",
        ),
        ({"forecasts": ()}, r"forecasts must be among the registered modes linear, none; got \[\]"),
        ({"step_counts": (10, 12)}, r"step_counts must be ints in \[2, steps=10\], got \[10, 12\]"),
        ({"step_counts": (1,)}, r"step_counts must be ints in \[2, steps=10\], got \[1\]"),
    ],
)
def test_candidates_refuse_unknown_forecasts_and_step_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        candidates({0: 0.1}, 10, [2], ["uniform"], 2.0, center=5, power=1.4, **kwargs)


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

    monkeypatch.setattr(sys.modules["dcfx.tune.search"], "time_interleaved", spy)  # where tune() looks it up
    result = tune(
        tiny_work,
        **{"steps": 4, "batch": 1, "size": 8, "seeds": 1, "repeats": 2, "max_rounds": 3, "branches": (0,)},
        **{"intervals": (2, 3), "schedules": ("uniform",), "min_speedup": 1.0, "latency": 1e3},  # measures all
        **{"out": tmp_path, "progress": False, "log": lambda msg: None},
    )
    configs = (dcfx.DeepCacheConfig(branch=0, interval=n, forecast=f) for n in (2, 3) for f in ("none", "linear"))
    keys = {json.dumps(c.to_dict(), sort_keys=True) for c in configs}  # every forecast mode, in the same rounds
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
    assert result.counts["pruned"] == result.counts["candidates"] == 4  # N 2, 3 x forecast none, linear
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
        ({"forecasts": ("none", "cubic")}, r"forecasts must be among the registered modes linear, none; got"),
        ({"step_counts": (60,)}, r"step_counts must be ints in \[2, steps=50\], got \[60\]"),
    ],
)
def test_bad_arguments(tiny_work, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(tiny_work, out=tmp_path, progress=False, log=lambda msg: None, **kwargs)


@pytest.mark.slow
def test_cli_on_a_diffusers_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_unet(layers_per_block=1).save_pretrained(folder / "unet")
    out = tmp_path / "out"
    code = cli.main(
        [
            "tune",
            *("--model", str(folder), "--steps", "4", "--batch", "1", "--size", "8", "--seeds", "1"),
            *("--branches", "0", "--intervals", "2", "--schedules", "uniform", "--repeats", "1"),
            *("--forecasts", "linear", "--step-counts", "3-4", "--min-speedup", "1.0"),
            *("--latency", "1000", "--out", str(out)),  # a goal that prunes nothing, whatever the host's load
        ]
    )
    printed = capsys.readouterr()
    assert "Pareto frontier" in printed.err and "report.md, pareto.png" in printed.out
    data = json.loads((out / "results.json").read_text())
    assert data["workload"]["model_class"] == "UNet2DConditionModel" and data["workload"]["steps"] == 4
    assert data["space"] == {"forecasts": ["linear"], "step_counts": [4, 3]}
    rows = sorted((r["steps"], r["config"]["interval"], r["config"].get("forecast")) for r in data["measurements"])
    assert rows == [(3, 1, None), (3, 2, "linear"), (4, 2, "linear")]  # no cache at 3 steps joins
    assert code == 0 and data["chosen"] is not None and data["chosen_steps"] in (3, 4)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--forecasts", "quadratic", "forecasts must be among the registered modes linear, none; got ['quadratic']"),
        ("--step-counts", "60", "step"),
    ],
)
def test_cli_bad_settings_exit_cleanly_before_measuring(tmp_path, capsys, flag, value, message):
    code = cli.main(["tune", "--steps", "50", "--latency", "1", flag, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dcfx tune: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def digits_work():
    return load_workload("digits")


@pytest.mark.slow
def test_tune_on_digits_searches_forecast_modes_and_fewer_steps(digits_work, tmp_path):
    options = {
        **{"steps": 8, "batch": 2, "seeds": 2, "repeats": 1, "max_rounds": 2, "tolerance": 0.5, "min_speedup": 1.0},
        **{"branches": (0,), "intervals": (2, 3), "schedules": ("uniform",), "step_counts": (8, 6), "latency": 1e3},
        **{"out": tmp_path, "progress": False, "log": lambda msg: None},
    }
    result = tune(digits_work, **options)
    by = {(p.steps, p.config["interval"], p.forecast): p for p in result.measurements}
    cached = {(k, n, f) for k in (8, 6) for n in (2, 3) for f in ("none", "linear")}
    assert set(by) == cached | {(6, 1, "none")} and len(result.measurements) == 9  # no cache at 6 steps too
    assert result.space == {"forecasts": ["none", "linear"], "step_counts": [8, 6]}
    for k, n, f in cached:
        assert 0 < by[(k, n, f)].psnr_db < PSNR_CAP
        if f == "linear":  # the forecast changes what shallow steps read, so the images
            assert by[(k, n, f)].psnr_db != by[(k, n, "none")].psnr_db
    # Quality is against no cache at the reference's 8 steps, whatever a candidate's own count.
    unet, size = digits_work.unet, int(digits_work.unet.config.sample_size)
    noise, cond = digits_work.inputs([0, 1], size)
    reference = generate(unet, digits_work.scheduler(), noise, cond, 8)
    six_steps = generate(unet, digits_work.scheduler(), noise, cond, 6)
    assert by[(6, 1, "none")].psnr_db == pytest.approx(fidelity([six_steps], [reference]), abs=0.05)
    assert by[(6, 1, "none")].psnr_db < 60  # six steps are not eight: far from the cap
    # The choice (the best quality: the budget allows all) is a config that builds, with a registered
    # forecast mode and its step count.
    chosen = result.chosen
    assert chosen is max(result.measurements, key=lambda p: p.psnr_db)
    built = dcfx.DeepCacheConfig(**chosen.config)
    assert built.forecast == chosen.forecast and built.forecast in available_forecasts()
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["deepcache"] == chosen.config and written["tune"]["steps"] == chosen.steps
    assert written["tune"]["reference_steps"] == 8 and result.check["steps"] == chosen.steps
    assert result.check["psnr_db"] == pytest.approx(chosen.psnr_db, abs=1e-4)  # eager: the same images
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["steps"], r["config"].get("forecast", "none")) for r in saved["measurements"]) == sorted(
        (p.steps, p.forecast) for p in result.measurements
    )
    assert saved["chosen_steps"] == chosen.steps
    report = (tmp_path / "report.md").read_text()
    assert "| branch | N | schedule | forecast | steps |" in report
    assert "| - | 1 | no cache | - | 6 |" in report
    for (k, n, f), p in by.items():
        if p.caches:
            assert f"| 0 | {n} | uniform | {f} | {k} | {p.flop_share:.3f} |" in report
    assert (tmp_path / "pareto.png").stat().st_size > 0

    # Again at 6 steps only, forecast only: everything comes from the cache, and the check samples 6 steps.
    again = tune(digits_work, **{**options, "forecasts": ("linear",), "step_counts": (6,)})
    assert again.counts["measured"] == 0 and again.counts["cached"] == 3
    assert {(p.steps, p.config["interval"], p.forecast) for p in again.measurements} == {
        (6, 2, "linear"),
        (6, 3, "linear"),
        (6, 1, "none"),
    }
    for p in again.measurements:
        assert p.psnr_db == by[(p.steps, p.config["interval"], p.forecast)].psnr_db
    assert again.chosen.steps == 6 and again.check["steps"] == 6
    assert again.check["psnr_db"] == pytest.approx(again.chosen.psnr_db, abs=1e-4)
    assert dcfx.DeepCacheConfig.load(tmp_path / "config.json").to_dict() == again.chosen.config
    assert "sample with 6 steps, not 8 (num_inference_steps=6)" in summary(again)
