"""The ``tune`` driver: measure the candidates, find the frontier, choose for the goal, check the choice.

The steps are in the package's docstring (``dcfx.tune``); the settings in ``dcfx.tune.options``.
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
from dcfx.branches import branches as list_branches
from dcfx.config import DeepCacheConfig
from dcfx.models import TransformerSpec, spec_for
from dcfx.tune.cost import MARGIN, Candidate, candidates
from dcfx.tune.cuts import Cut, check_knobs, cut_fields, searched_shares
from dcfx.tune.goal import Goal, choose, pareto
from dcfx.tune.measure import (
    Measurement,
    Prepare,
    ResultCache,
    Rounds,
    fidelity,
    finite_spread,
    machine,
    time_interleaved,
    timing_entry,
)
from dcfx.tune.options import MeasureSettings, SearchSpace, gather, settings_errors
from dcfx.tune.report import NO_PLOT, TuneResult, plotting_available, summary, write_config, write_outputs
from dcfx.tune.workload import Batch, Runner, Workload, load_workload
from dcfx.util import weights_digest


def tune(
    model: str | Workload = "digits",
    *,
    space: SearchSpace | None = None,
    measure: MeasureSettings | None = None,
    out: str | os.PathLike[str] | None = "tune_out",
    cache: str | os.PathLike[str] | bool = True,
    verify: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress: bool = True,
    **settings: Any,
) -> TuneResult:
    """Returns the measured Pareto frontier of DeepCache configurations and the best one for a goal.

    Args:
        model: "digits" (the bundled model), a built-in config name, a diffusers folder, or a
            ``Workload``.
        space: What to search: the goal, the reference step count, the candidates
            (default: ``SearchSpace()``, no goal, every branch of a U-Net; a transformer's
            block ranges as ``dcfx.tune.cuts`` says).
        measure: How to measure: sampler, batch, seeds, backend, rounds (default: ``MeasureSettings()``).
        out: Where config.json, report.md, pareto.png and results.json go (None: nowhere). The
            plot needs matplotlib; without it, tune says so at the start and skips only the plot.
        cache: True (``out``/cache.json), a path, or False (measure everything again).
        verify: Rerun the chosen configuration from config.json and report it against the tuner's numbers.
        log: Where progress lines and the summary go (default: stderr).
        progress: Show a progress bar.
        **settings: Any field of ``SearchSpace`` or ``MeasureSettings`` by name (``steps=50``,
            ``speedup=3.0``, ``batch=2``, ...); each replaces that field of ``space`` or ``measure``.

    A diffusion transformer is searched over block ranges (``first=``/``last=``) where a U-Net
    is over branches; the rest is the same. While candidates are timed, the graphs of every
    measured cut and forecast mode stay built (one pair per cut and mode, sharing the model's
    weights; Inductor's freezing copies them into each pair): switching forecasting on or off
    rebuilds a runtime's graphs.

    Raises:
        TuneSettingsError: (a ValueError) bad goal (several), scheduler, model, branch or block range, interval,
            schedule, forecast mode, step count, sizes or rounds; raised before anything is measured.
        TypeError: a keyword that is no setting, naming the valid ones.
    """
    start = time.perf_counter()
    with settings_errors():  # every setting is checked before anything is measured
        space, measure = gather(space, measure, settings)
        out_dir = Path(out) if out is not None else None
        plot = out_dir is not None and plotting_available()
        if out_dir is not None and not plot:
            log(f"dcfx tune: {NO_PLOT}")
        work = model if isinstance(model, Workload) else load_workload(model, measure.scheduler)
        unet = work.unet
        spec = spec_for(unet)
        if isinstance(spec, TransformerSpec):  # the wrong kind of cut is refused before the FLOPs are counted
            check_knobs(True, len(spec.blocks(unet)), space.branches, space.first, space.last)
        else:
            check_knobs(False, len(spec.up_layers(unet)), space.branches, space.first, space.last)
        size = measure.size or spec.default_size(unet)
        infos = list_branches(unet, spec.sample_shape(unet, measure.batch, size, size))
        shares = searched_shares(infos, space.branches, space.first, space.last, log)
    goal, steps, rounds, step_counts = space.goal, space.steps, measure.rounds, space.sampling_steps

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
        "batch": measure.batch,
        "size": size,
        "backend": measure.backend,
        "seeds": measure.seeds,
        "machine": machine(),
    }
    wkey = hashlib.sha256(json.dumps(workload, sort_keys=True).encode()).hexdigest()[:16]
    store = _Store(ResultCache(cache_path), wkey)

    runner = Runner(work, measure.seeds, measure.batch, size, steps, measure.backend)
    try:
        baseline_s, full_s = _baseline_and_unit(runner, store, min(shares), rounds, log)
        pool, infeasible = candidates(
            shares,
            steps,
            space.intervals,
            space.schedules,
            full_s,
            space.schedule_center,
            space.power,
            space.forecasts,
            step_counts,
        )
        counts = dict.fromkeys(("pruned", "measured", "cached", "rounds", "unsettled"), 0)
        counts = {"candidates": len(pool) + infeasible, "no_schedule": infeasible, **counts}
        # Pruning saves measuring: what an earlier run measured still joins the frontier.
        keep = [
            c for c in pool if not _hopeless(c, goal, baseline_s, space.min_speedup) or store.get(c.key) is not None
        ]
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
        space={"forecasts": list(space.forecasts), "step_counts": list(step_counts)},
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if chosen is not None:
            write_config(result, out_dir / "config.json")
            result.written.append("config.json")
    if verify and chosen is not None:
        result.check = check_choice(work, chosen, steps, measure.backend, runner.batches, rounds, out_dir, log)
    result.wall_s = time.perf_counter() - start
    if out_dir is not None:
        result.written += write_outputs(result, out_dir, plot=plot)
        if not plot:
            log(f"dcfx tune: {NO_PLOT}")
    log(summary(result))
    return result


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
    runner: Runner, store: _Store, cut: Cut, rounds: Rounds, log: Callable[[str], None]
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
        pending["all-full"] = runner.cached_run(DeepCacheConfig(**cut_fields(cut), interval=1))  # type: ignore[arg-type]
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
            f"{timings[BASELINE].median_s:.3f} s for the plain model; timing both again (is the host busy?)"
        )
        timings = time_interleaved(pending, rounds, seed=1)
    for key, timing in timings.items():
        store.put(key, timing_entry(timing))
    baseline, unit = store.get(BASELINE), store.get("all-full")
    assert baseline is not None and unit is not None  # both stored above
    ratio = float(unit["latency_s"]) / float(baseline["latency_s"])
    if not UNIT_RATIO[0] <= ratio <= UNIT_RATIO[1]:
        log(
            f"dcfx tune: warning: the cost model's unit is {ratio:.2f}x the plain model's generation; predictions "
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
    reference = [work.sample(unet, plain_scheduler, n, c, steps) for n, c in batches]
    fast = compile_unet(unet, config, backend=backend, scheduler=work.scheduler())
    outs = [work.sample(fast, fast.scheduler, n, c, chosen.steps) for n, c in batches]  # builds and warms up, untimed

    def run(model: Any, scheduler: Any, n_steps: int) -> Prepare:
        def prepare(r: int) -> Callable[[], object]:
            noise, cond = batches[r % len(batches)]
            return functools.partial(work.sample, model, scheduler, noise, cond, n_steps)

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
