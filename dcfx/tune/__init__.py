"""``dcfx.tune``: the fastest DeepCache configuration that keeps quality, measured on this machine.

DeepCache has its knobs (branch, interval, schedule shape, forecast mode) whose best values
depend on the model, the sampler, the step count, the backend and the hardware, and a user's
real question is the fastest configuration that keeps quality, where sampling with fewer steps
is a competitor. ``tune`` measures them instead of guessing: the candidates are branch x
interval x schedule x forecast mode at each searched step count, and no cache at each step
count fewer than the reference's.

1. The no-cache generation of K calibration seeds at the requested shape: the reference
   images; the baseline latency.
2. A cost model (``cost``) from the branches' FLOP shares r predicts each candidate's latency
   as T1 x (full + shallow r) / steps, T1 being a measured generation of full steps through
   dcfx's graphs. Candidates that cannot pay (FLOP-ideal speedup below ``min_speedup``) or
   cannot meet a latency or speedup goal even with a generous margin are pruned before
   anything runs.
3. Each remaining candidate runs the K seeds once: its quality (PSNR of its images against the
   no-cache ones at the reference step count, whatever its own, mean in dB). For a quality
   goal, candidates run fastest predicted first and the search stops once nothing left can
   beat the best found.
4. The measured candidates are timed together in interleaved rounds (``measure``) until each
   one's median latency is known within a tolerance: its latency and that spread. Results are
   cached on disk, keyed by the model, the weights, the workload and this machine.
5. The Pareto frontier (latency against quality) and the choice for the goal (``goal``); the
   choice is checked by a fresh run from the written config file (``report`` writes the rest).

The package by job: ``workload`` (model, inputs, sampling loop), ``cost`` (candidates and
predictions), ``measure`` (timing, fidelity, the cache), ``goal`` (frontier and choice),
``report`` (summary, files, plot).

Example:
    >>> result = dcfx.tune("digits", steps=50, speedup=3.0, out="tune_out")
    >>> unet = dcfx.compile(unet, config="tune_out/config.json", scheduler=scheduler)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcfx.api import compile as compile_unet
from dcfx.backends import get_backend
from dcfx.branches import branches as list_branches
from dcfx.config import DeepCacheConfig
from dcfx.models import spec_for
from dcfx.tune.cost import (
    MARGIN,
    SEARCHABLE_SCHEDULES,
    Candidate,
    candidates,
    check_forecasts,
    check_schedules,
    check_step_counts,
)
from dcfx.tune.goal import GOALS, Goal, choose, pareto
from dcfx.tune.measure import (
    PSNR_CAP,
    Measurement,
    Prepare,
    ResultCache,
    Rounds,
    Timing,
    fidelity,
    finite_spread,
    machine,
    median_spread,
    time_interleaved,
    timing_entry,
    weights_digest,
)
from dcfx.tune.report import (
    NO_PLOT,
    TuneResult,
    frontier_table,
    plotting_available,
    summary,
    write_config,
    write_outputs,
)
from dcfx.tune.workload import (
    SCHEDULERS,
    Batch,
    DigitsWorkload,
    FolderWorkload,
    Runner,
    Workload,
    generate,
    load_workload,
)

__all__ = [
    "GOALS",
    "MARGIN",
    "PSNR_CAP",
    "SCHEDULERS",
    "SEARCHABLE_SCHEDULES",
    "Candidate",
    "DigitsWorkload",
    "FolderWorkload",
    "Goal",
    "Measurement",
    "Rounds",
    "Timing",
    "TuneResult",
    "TuneSettingsError",
    "Workload",
    "candidates",
    "check_choice",
    "choose",
    "fidelity",
    "frontier_table",
    "generate",
    "load_workload",
    "median_spread",
    "pareto",
    "summary",
    "time_interleaved",
    "tune",
]


class TuneSettingsError(ValueError):
    """A ``tune`` setting that cannot be searched, found before anything is measured."""


def tune(
    model: str | Workload = "digits",
    *,
    scheduler: str = "ddim",
    steps: int = 50,
    batch: int = 10,
    size: int | None = None,
    backend: str = "eager",
    seeds: int = 20,
    latency: float | None = None,
    speedup: float | None = None,
    quality: float | None = None,
    branches: Sequence[int] | None = None,
    intervals: Sequence[int] = tuple(range(2, 11)),
    schedules: Sequence[str] = SEARCHABLE_SCHEDULES,
    forecasts: Sequence[str] = ("none", "linear"),
    step_counts: Sequence[int] | None = None,
    center: int | None = None,
    power: float = 1.4,
    min_speedup: float = 1.1,
    repeats: int = 3,
    max_rounds: int = 10,
    tolerance: float = 0.03,
    out: str | os.PathLike[str] | None = "tune_out",
    cache: str | os.PathLike[str] | bool = True,
    verify: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress: bool = True,
) -> TuneResult:
    """Returns the measured Pareto frontier of DeepCache configurations and the best one for a goal.

    Args:
        model: "digits" (the bundled model), a built-in config name, a diffusers folder, or a
            ``Workload``.
        scheduler: "ddim", "dpm" or "euler".
        steps: Denoising steps of the no-cache reference: the quality of every candidate is its
            PSNR against the reference's images, and speedups are over its latency.
        batch: Samples per generation (the batch the latency is measured at).
        size: Latent height and width (default: the model's ``sample_size``).
        backend: A registered backend ("eager", "inductor").
        seeds: K, the calibration seeds (one sample each: a class label or a prompt embedding), a
            multiple of ``batch``.
        latency: Goal: seconds per generation at most; the best quality within it is chosen.
        speedup: Goal: at least this speedup over no cache; the best quality is chosen.
        quality: Goal: PSNR (dB) against no cache at least; the lowest latency is chosen.
        branches: Branch ids to consider (default: every branch of the model).
        intervals: Values of N to consider.
        schedules: "uniform" and/or "non-uniform".
        forecasts: Forecast modes (``dcfx.forecast.available_forecasts()``: "none", the paper's
            reuse, and "linear"); each branch x interval x schedule is a candidate in each.
        step_counts: Step counts k to sample with, each in [2, ``steps``] (default: ``steps``
            only). At each k fewer than ``steps`` the candidates are no cache at k steps and
            every cached configuration at k steps.
        center: The non-uniform schedule's centre at ``steps`` (default: 30% of the steps, as the
            paper's 15 of 50); scaled to each step count.
        power: The non-uniform schedule's power.
        min_speedup: Candidates whose FLOP-ideal speedup is below this are pruned.
        repeats: Timed generations per candidate at least (interleaved rounds; the latency is their median).
        max_rounds: Timed generations per candidate at most, whether its spread settled or not.
        tolerance: Rounds go on until each latency's spread (the half-width of its median's 90%
            confidence interval, relative to it; see ``dcfx.tune.measure``) is at most this, or
            ``max_rounds`` have run.
        out: Where config.json, report.md, pareto.png and results.json go (None: nowhere). The
            plot needs matplotlib; without it, tune says so at the start and skips only the plot.
        cache: True (``out``/cache.json), a path, or False (measure everything again).
        verify: Rerun the chosen configuration from config.json and report it against the tuner's numbers.
        log: Where progress lines and the summary go (default: stderr).
        progress: Show a progress bar.

    While candidates are timed, the graphs of every measured branch and forecast mode stay built
    (one pair per branch and mode, sharing the model's weights; Inductor's freezing copies them
    into each pair): switching forecasting on or off rebuilds a runtime's graphs.

    Raises:
        TuneSettingsError: (a ValueError) bad goal (none or several), scheduler, model, branch,
            interval, schedule, forecast mode, step count, sizes or rounds; raised before
            anything is measured.
    """
    start = time.perf_counter()
    try:  # every setting is checked before anything is measured
        goal = _goal(latency, speedup, quality)
        for name, value, low in (
            ("steps", steps, 2),
            ("batch", batch, 1),
            ("seeds", seeds, 1),
            ("repeats", repeats, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(max_rounds, int) and max_rounds < repeats:
            raise ValueError(f"max_rounds ({max_rounds}) must be >= repeats ({repeats}), the least timed generations")
        rounds = Rounds(min_rounds=repeats, max_rounds=max_rounds, tolerance=tolerance)
        if seeds % batch:
            raise ValueError(
                f"seeds ({seeds}) must be a multiple of batch ({batch}): every generation runs a full batch"
            )
        check_schedules(schedules)
        forecasts = check_forecasts(forecasts)
        step_counts = (steps,) if step_counts is None else check_step_counts(step_counts, steps)
        bad_n = [n for n in intervals if isinstance(n, bool) or not isinstance(n, int) or n < 2]
        if bad_n or not intervals:
            raise ValueError(f"intervals must be ints >= 2 (1 is no cache), got {list(intervals)}")
        get_backend(backend)
        out_dir = Path(out) if out is not None else None
        plot = out_dir is not None and plotting_available()
        if out_dir is not None and not plot:
            log(f"dcfx tune: {NO_PLOT}")
        work = model if isinstance(model, Workload) else load_workload(model, scheduler)
        unet = work.unet
        size = size or int(unet.config.sample_size)
        center = round(0.3 * steps) if center is None else center

        spec = spec_for(unet)
        infos = list_branches(unet, spec.sample_shape(unet, batch, size, size))
        valid = [b.branch for b in infos]
        chosen_branches = valid if branches is None else list(branches)
        unknown = [b for b in chosen_branches if b not in valid]
        if unknown:
            raise ValueError(f"branches {unknown} are not branches of this model; valid: 0..{len(valid) - 1}")
    except ValueError as e:
        raise TuneSettingsError(str(e)) from e
    shares = {b.branch: b.flop_share for b in infos if b.branch in chosen_branches}

    cache_path = None
    if cache is True and out_dir is not None:
        cache_path = out_dir / "cache.json"
    elif cache not in (True, False):
        cache_path = Path(cache)  # type: ignore[arg-type]
    workload = {
        **work.describe(),
        "model_class": type(unet).__name__,
        "weights": weights_digest(unet),
        "steps": steps,
        "batch": batch,
        "size": size,
        "backend": backend,
        "seeds": seeds,
        "machine": machine(),
    }
    wkey = hashlib.sha256(json.dumps(workload, sort_keys=True).encode()).hexdigest()[:16]
    store = _Store(ResultCache(cache_path), wkey)

    runner = Runner(work, seeds, batch, size, steps, backend)
    try:
        baseline_s, full_s = _baseline_and_unit(runner, store, min(shares), rounds, log)
        pool, infeasible = candidates(
            shares, steps, intervals, schedules, full_s, center, power, forecasts, step_counts
        )
        counts = dict.fromkeys(("pruned", "measured", "cached", "rounds", "unsettled"), 0)
        counts = {"candidates": len(pool) + infeasible, "no_schedule": infeasible, **counts}
        # Pruning saves measuring: what an earlier run measured still joins the frontier.
        keep = [c for c in pool if not _hopeless(c, goal, baseline_s, min_speedup) or store.get(c.key) is not None]
        counts["pruned"] = len(pool) - len(keep)
        keep.sort(key=lambda c: c.predicted_s)
        found, fresh = _quality_pass(runner, store, keep, goal, baseline_s, counts, progress)
        if fresh:
            log(f"dcfx tune: timing {len(fresh)} configurations in interleaved rounds ({_rounds_text(rounds)}) ...")
            found.update(_time_candidates(runner, store, fresh, rounds, counts, progress))
            baseline_s = float(store.get(BASELINE)["latency_s"])  # type: ignore[index]  # timed alongside
    finally:
        runner.close()

    measured = [found[c.key] for c in keep if c.key in found]
    chosen = choose(measured, goal, baseline_s) if goal is not None else None
    result = TuneResult(
        workload={k: v for k, v in workload.items() if k != "machine"},
        goal=goal,
        baseline_s=baseline_s,
        baseline_spread=finite_spread(store.get(BASELINE)["times_s"]),  # type: ignore[index]
        full_s=full_s,
        measurements=measured,
        frontier=pareto(measured),
        chosen=chosen,
        check=None,
        counts=counts,
        wall_s=0.0,
        out=out_dir,
        machine=workload["machine"],
        rounds=rounds,
        space={"forecasts": list(forecasts), "step_counts": list(step_counts)},
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if chosen is not None:
            write_config(result, out_dir / "config.json")
            result.written.append("config.json")
    if verify and chosen is not None:
        result.check = check_choice(work, chosen, steps, backend, runner.batches, rounds, out_dir, log)
    result.wall_s = time.perf_counter() - start
    if out_dir is not None:
        result.written += write_outputs(result, out_dir, plot=plot)
        if not plot:
            log(f"dcfx tune: {NO_PLOT}")
    log(summary(result))
    return result


def _goal(latency: float | None, speedup: float | None, quality: float | None) -> Goal | None:
    goals = [Goal(k, v) for k, v in (("latency", latency), ("speedup", speedup), ("quality", quality)) if v is not None]
    if len(goals) > 1:
        raise ValueError(f"give one goal (latency=, speedup= or quality=), got {[g.kind for g in goals]}")
    return goals[0] if goals else None


BASELINE = "baseline"  # the no-cache baseline's key in the results cache and among timed runs


class _Store:
    """The results cache seen from one workload: keys are prefixed with the workload's."""

    def __init__(self, cache: ResultCache, wkey: str) -> None:
        self.cache = cache
        self.wkey = wkey

    def get(self, key: str) -> dict[str, Any] | None:
        return self.cache.get(f"{self.wkey}:{key}")

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.cache.put(f"{self.wkey}:{key}", value)


# A generation of full steps through dcfx's graphs runs the plain U-Net's work: outside these
# bounds of the plain generation's latency, a measurement is off (see _baseline_and_unit).
UNIT_RATIO = (0.5, 2.0)


def _baseline_and_unit(
    runner: Runner, store: _Store, branch: int, rounds: Rounds, log: Callable[[str], None]
) -> tuple[float, float]:
    """Returns the no-cache latency and the cost model's unit, timed together (or from the cache).

    The unit is a generation of full steps through dcfx's graphs (no Python module overhead,
    unlike the plain U-Net), so that predictions compare with what runs.
    """
    pending: dict[str, Prepare] = {}
    if store.get(BASELINE) is None:
        log(f"dcfx tune: no-cache reference, {len(runner.batches)} x batch {runner.batch}, {runner.steps} steps ...")
        runner.reference()
        pending[BASELINE] = runner.plain_run
    if store.get("all-full") is None:
        pending["all-full"] = runner.cached_run(DeepCacheConfig(branch=branch, interval=1))
    timings = time_interleaved(pending, rounds)
    if (
        len(timings) == 2
        and not UNIT_RATIO[0] <= timings["all-full"].median_s / timings[BASELINE].median_s <= UNIT_RATIO[1]
    ):
        # The same work through dcfx's graphs and through the plain U-Net: far apart, the
        # host's load moved under one of them (seen: 7.6 s against 1.2 s while compiles ran
        # beside). Every prediction and every pruning scales the unit: time both again.
        log(
            f"dcfx tune: the all-full dcfx generation measured {timings['all-full'].median_s:.3f} s against "
            f"{timings[BASELINE].median_s:.3f} s for the plain U-Net; timing both again (is the host busy?)"
        )
        timings = time_interleaved(pending, rounds, seed=1)
    for key, timing in timings.items():
        store.put(key, timing_entry(timing))
    baseline, unit = store.get(BASELINE), store.get("all-full")
    assert baseline is not None and unit is not None  # both stored above
    ratio = float(unit["latency_s"]) / float(baseline["latency_s"])
    if not UNIT_RATIO[0] <= ratio <= UNIT_RATIO[1]:
        log(
            f"dcfx tune: warning: the cost model's unit is {ratio:.2f}x the plain U-Net's generation; predictions "
            "and pruning rest on it: rerun on a quieter host (with --no-cache) if that is not expected"
        )
    return float(baseline["latency_s"]), float(unit["latency_s"])


def _hopeless(c: Candidate, goal: Goal | None, baseline_s: float, min_speedup: float) -> bool:
    if c.ideal_speedup < min_speedup:
        return True
    budget = goal.budget_s(baseline_s) if goal is not None else None
    return budget is not None and c.predicted_s > budget * (1 + MARGIN)


def _measurement(cand: Candidate, entry: dict[str, Any], cached: bool) -> Measurement:
    return Measurement(
        config=cand.config.to_dict(),
        steps=cand.steps,
        full_steps=cand.full_steps,
        flop_share=cand.flop_share,
        predicted_s=cand.predicted_s,
        latency_s=float(entry["latency_s"]),
        times_s=list(entry["times_s"]),
        psnr_db=float(entry["psnr_db"]),
        cached=cached,
        spread=finite_spread(entry["times_s"]),
    )


def _quality_pass(
    runner: Runner,
    store: _Store,
    keep: Sequence[Candidate],
    goal: Goal | None,
    baseline_s: float,
    counts: dict[str, int],
    progress: bool,
) -> tuple[dict[str, Measurement], dict[str, _Fresh]]:
    """Returns the measurements of cached candidates, and the quality of those measured now.

    A candidate not in the cache runs the K seeds once for its quality. The times of that pass
    are a first, untrusted latency, used only to stop a quality search early (the latencies
    come from the interleaved rounds); the cache keeps them, so that a second run stops at the
    same candidate.
    """
    floor = goal if goal is not None and goal.kind == "quality" else None
    found: dict[str, Measurement] = {}
    fresh: dict[str, _Fresh] = {}
    first_pass: list[Measurement] = []
    bar = _progress(progress, len(keep), "dcfx tune: quality")
    for cand in keep:
        hit = store.get(cand.key)
        best = choose(first_pass, floor, baseline_s) if floor is not None and hit is None else None
        if hit is not None:
            found[cand.key] = _measurement(cand, hit, cached=True)
            counts["cached"] += 1
            rough = {**hit, "latency_s": hit.get("first_pass_s", hit["latency_s"])}
            first_pass.append(_measurement(cand, rough, cached=True))
        elif best is not None and cand.predicted_s * (1 - MARGIN) > best.latency_s:
            counts["pruned"] += 1  # cannot beat the fastest that meets the floor
        else:
            outs, times = runner.outputs(cand.config, cand.steps)
            fresh[cand.key] = _Fresh(cand, fidelity(outs, runner.reference()), statistics.median(times))
            rough = {"latency_s": fresh[cand.key].first_pass_s, "times_s": times, "psnr_db": fresh[cand.key].psnr_db}
            first_pass.append(_measurement(cand, rough, cached=False))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return found, fresh


@dataclass(frozen=True)
class _Fresh:
    """A candidate measured in this run: its quality and its first-pass latency, not yet timed."""

    candidate: Candidate
    psnr_db: float
    first_pass_s: float


def _time_candidates(
    runner: Runner,
    store: _Store,
    fresh: dict[str, _Fresh],
    rounds: Rounds,
    counts: dict[str, int],
    progress: bool,
) -> dict[str, Measurement]:
    """Returns the measurements of the ``fresh`` candidates, timed in interleaved rounds (and caches them).

    The no-cache baseline runs in the same rounds and replaces the cached one: a speedup is a
    ratio of two latencies, and only latencies timed side by side survive a drifting load
    (seen here: a baseline timed under heavy load, then candidates timed after it eased, made
    80x of a 4x speedup).
    """
    runs = {key: runner.cached_run(f.candidate.config, f.candidate.steps) for key, f in fresh.items()}
    bar = _progress(progress, rounds.max_rounds, "dcfx tune: timing rounds")
    timings = time_interleaved(
        {**runs, BASELINE: runner.plain_run},
        rounds,
        on_round=None if bar is None else lambda r, left: bar.update(),
    )
    if bar is not None:
        bar.close()
    store.put(BASELINE, timing_entry(timings.pop(BASELINE)))
    out = {}
    for key, timing in timings.items():
        f = fresh[key]
        entry = {**timing_entry(timing), "psnr_db": f.psnr_db, "first_pass_s": f.first_pass_s}
        store.put(key, entry)
        out[key] = _measurement(f.candidate, entry, cached=False)
    counts["measured"] = len(timings)
    counts["rounds"] = max(len(t.times_s) for t in timings.values())
    counts["unsettled"] = sum(not rounds.settled(t.times_s) for t in timings.values())
    return out


def check_choice(
    work: Workload,
    chosen: Measurement,
    steps: int,
    backend: str,
    batches: Sequence[Batch],
    rounds: Rounds,
    out_dir: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Returns a fresh run of the chosen configuration (from config.json when written) against the tuner's numbers.

    The fresh runtime samples with the chosen step count; its quality is against the plain
    U-Net at ``steps`` (the reference), and the two are timed in interleaved rounds, so the
    check's speedup compares latencies timed side by side.
    """
    config: Any = out_dir / "config.json" if out_dir is not None else DeepCacheConfig.from_dict(chosen.config)
    log(f"dcfx tune: checking the choice {chosen.config} at {chosen.steps} steps with a fresh runtime ...")
    unet = work.unet
    plain_scheduler = work.scheduler()
    reference = [generate(unet, plain_scheduler, n, c, steps) for n, c in batches]
    fast = compile_unet(unet, config, backend=backend, scheduler=work.scheduler())
    outs = [generate(fast, fast.scheduler, n, c, chosen.steps) for n, c in batches]  # builds and warms up, untimed

    def run(model: Any, scheduler: Any, n_steps: int) -> Prepare:
        def prepare(r: int) -> Callable[[], object]:
            noise, cond = batches[r % len(batches)]
            return functools.partial(generate, model, scheduler, noise, cond, n_steps)

        return prepare

    # More runs than a candidate gets: the check is one configuration, and a shared host drifts.
    least = max(5, rounds.min_rounds + 2)
    check_rounds = Rounds(least, max(least, rounds.max_rounds), rounds.tolerance)
    runs = {"check": run(fast, fast.scheduler, chosen.steps), BASELINE: run(unet, plain_scheduler, steps)}
    timings = time_interleaved(runs, check_rounds)
    fast.clear_graphs()
    quality_db = fidelity(outs, reference)
    latency, baseline_s = timings["check"].median_s, timings[BASELINE].median_s
    return {
        "config_file": str(config) if isinstance(config, Path) else None,
        "steps": chosen.steps,
        "latency_s": latency,
        "spread": finite_spread(timings["check"].times_s),
        "times_s": list(timings["check"].times_s),
        "baseline_s": baseline_s,
        "baseline_spread": finite_spread(timings[BASELINE].times_s),
        "psnr_db": quality_db,
        "tuned_latency_s": chosen.latency_s,
        "tuned_psnr_db": chosen.psnr_db,
        "predicted_latency_s": chosen.predicted_s,
        "latency_error": latency / chosen.latency_s - 1,
        "prediction_error": latency / chosen.predicted_s - 1,
        "psnr_error_db": quality_db - chosen.psnr_db,
        "speedup": baseline_s / latency,
    }


def _rounds_text(rounds: Rounds) -> str:
    per = f"{rounds.min_rounds}-{rounds.max_rounds} per configuration"
    return f"{per}, until the median's spread <= {rounds.tolerance:.1%}"


def _progress(show: bool, total: int, desc: str) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
