"""Load test of dcfx.serve: Poisson arrivals through the engine, five ways of batching, and Ray Serve.

The bundled digits model, one digit per request, 50 DDIM steps, DeepCache branch 0 at 1:5.
At each offered rate, requests arrive as a Poisson process (open loop: arrivals do not wait for
answers) and run through the step-batching engine driven in this process, for:

- ``one-at-a-time``: one request at a time (``max_batch=1``), DeepCache 1:5;
- ``request-batching``: a batch of waiting requests runs to completion while new ones wait;
- ``step-unaligned``: step batching without phase alignment (``max_wait=0``: a request starts
  at once, its full steps fall wherever they fall);
- ``dcfx``: step batching with phase alignment (a request waits for its cohort's next full
  step, at most 4 ticks);
- ``step-nocache``: step batching without DeepCache (every step full).

Latency is from a request's arrival to its last step; throughput is the departure rate (requests
finished per second between the first and the last counted departure). The first
``--warmup-requests`` of each run are left out (the system starts empty). A run keeps up when
its requests leave at >= 0.9x the rate they arrived at (else a backlog grows). Then the same
at one rate through the Ray Serve HTTP path (one replica, a client thread per request), so the
HTTP and Ray overhead is a number.

Writes serve_load.json (everything, machine and load average included), serve_load.md and
serve_load.png (latency against throughput).

    python benchmarks/serve_load.py --out docs/benchmarks/serve
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dcfx  # noqa: E402
from dcfx.digits import load_model  # noqa: E402
from dcfx.serve import DigitsServeModel, Engine, EngineConfig, GenerationRequest  # noqa: E402

VARIANTS = ("one-at-a-time", "request-batching", "step-unaligned", "dcfx", "step-nocache")
# A run keeps up when its requests leave at >= this share of the rate they arrived at.
KEEP_UP = 0.9


@dataclasses.dataclass(frozen=True)
class Scenario:
    """What one benchmark run measures."""

    rates: tuple[float, ...] = (2.0, 3.0, 4.0, 6.0, 9.0, 13.0)
    seconds_per_rate: float = 10.0  # requests per run: rate x this, within [min_requests, max_requests]
    min_requests: int = 30
    max_requests: int = 80
    repeats: int = 2  # runs per (rate, variant), variants in a shuffled order each time
    warmup_requests: int = 8
    steps: int = 50
    branch: int = 0
    interval: int = 5
    forecast: str = "none"  # what shallow steps read: "none" (reuse) or "linear"
    max_batch: int = 16
    threads: int = 1
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS
    ray_rate: float | None = 5.0

    def requests_at(self, rate: float) -> int:
        return int(min(self.max_requests, max(self.min_requests, round(rate * self.seconds_per_rate))))


def variant_setup(name: str, scenario: Scenario) -> tuple[int, EngineConfig]:
    """Returns the DeepCache interval and the engine settings of a variant."""
    m = scenario.max_batch
    return {
        "one-at-a-time": (scenario.interval, EngineConfig(max_batch=1, batch_sizes=(1,), max_queue=100_000)),
        "request-batching": (scenario.interval, EngineConfig(max_batch=m, batching="request", max_queue=100_000)),
        "step-unaligned": (scenario.interval, EngineConfig(max_batch=m, max_wait=0, max_queue=100_000)),
        "dcfx": (scenario.interval, EngineConfig(max_batch=m, max_queue=100_000)),
        "step-nocache": (1, EngineConfig(max_batch=m, max_queue=100_000)),
    }[name]


def arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Returns ``count`` Poisson arrival times (seconds from 0) at ``rate`` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def request_for(i: int, steps: int) -> GenerationRequest:
    return GenerationRequest(labels=(i % 10,), seed=i, steps=steps)


def drive(engine: Engine, times: Sequence[float], steps: int) -> tuple[list[tuple[float, float]], float, list[Any]]:
    """Runs the arrivals through ``engine`` in this thread.

    Returns each request's (arrival, finish); the share of a core this thread got while it
    ticked (its CPU time over the wall time of its ticks: 1.0 undisturbed, lower where other
    processes took the core); and each request's admission wait: (ticks it waited from its
    submission to its first step, those ticks' seconds, seconds from its arrival to its
    submission, i.e. the end of the tick in flight when it arrived).
    """
    start = time.perf_counter()
    futures, submitted, submit_s = [], 0, []
    tick_wall = tick_cpu = 0.0
    tick_starts: list[float] = []  # the engine's tick i began at tick_starts[i] (ticks that ran)
    while submitted < len(times) or not all(f.done() for f in futures):
        now = time.perf_counter() - start
        while submitted < len(times) and times[submitted] <= now:
            futures.append(engine.submit(request_for(submitted, steps)))
            submit_s.append(time.perf_counter())
            submitted += 1
        wall, cpu = time.perf_counter(), time.thread_time()
        ticked = engine.tick()
        tick_wall += time.perf_counter() - wall
        tick_cpu += time.thread_time() - cpu
        if ticked:
            tick_starts.append(wall)
        elif submitted < len(times):
            time.sleep(max(0.0, times[submitted] - (time.perf_counter() - start)))
    results = [f.result() for f in futures]
    spans = [(start + t, r.finished_s) for t, r in zip(times, results, strict=True)]
    waits = [
        (r.waited_ticks, tick_starts[r.start_tick] - tick_starts[r.start_tick - r.waited_ticks], s - (start + t))
        for t, r, s in zip(times, results, submit_s, strict=True)
    ]
    return spans, tick_cpu / tick_wall if tick_wall else 1.0, waits


def summarize(runs: Sequence[Sequence[tuple[float, float]]], rate: float, warmup: int) -> dict[str, Any]:
    """Returns throughput, latency percentiles and whether the runs kept up with their arrivals.

    Latencies of the runs are pooled; throughput and the keep-up ratio are their means.
    """
    latencies, throughputs, ratios = [], [], []
    for spans in runs:
        counted = list(spans[warmup:])
        latencies += [f - a for a, f in counted]
        arrived = [a for a, _ in counted]
        finishes = sorted(f for _, f in counted)
        # Departures per second against arrivals per second of the same requests: equal (up to
        # the spread of latencies) when the system keeps up, the service rate when a backlog builds.
        throughputs.append((len(finishes) - 1) / (finishes[-1] - finishes[0]))
        ratios.append(throughputs[-1] / ((len(arrived) - 1) / (arrived[-1] - arrived[0])))
    ordered = sorted(latencies)
    return {
        "offered_rate": rate,
        "runs": len(runs),
        "requests": sum(len(spans) for spans in runs),
        "counted": len(latencies),
        "throughput": statistics.fmean(throughputs),
        "departures_over_arrivals": statistics.fmean(ratios),
        "p50_s": percentile(ordered, 50),
        "p99_s": percentile(ordered, 99),
        "mean_s": statistics.fmean(latencies),
        "max_s": ordered[-1],
        "keeps_up": statistics.fmean(ratios) >= KEEP_UP,
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Returns the q-th percentile of sorted values (linear interpolation)."""
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def engine_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Returns the engine's call counts and mean live rows per call."""

    def mean_rows(hist: dict[int, int]) -> float:
        calls = sum(hist.values())
        return sum(rows * n for rows, n in hist.items()) / calls if calls else 0.0

    return {
        "ticks": stats["ticks"],
        "full_calls": stats["full_calls"],
        "shallow_calls": stats["shallow_calls"],
        "forecast_calls": stats["forecast_calls"],
        "mean_full_rows": mean_rows(stats["full_rows"]),
        "mean_shallow_rows": mean_rows(stats["shallow_rows"]),
        "padded_rows": stats["padded_rows"],
        "cache_copies": stats["cache_copies"],
    }


def run_engine_variants(
    scenario: Scenario, runtime: Any, serve_model: DigitsServeModel, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    order = random.Random(scenario.seed)
    for rate in scenario.rates:
        runs: dict[str, list[Any]] = {name: [] for name in scenario.variants}
        for repeat in range(scenario.repeats):
            # The cores are shared: variants take turns in a new order each time, on the same arrivals.
            times = arrivals(rate, scenario.requests_at(rate), scenario.seed + repeat)
            for name in order.sample(scenario.variants, len(scenario.variants)):
                runs[name].append(run_variant(name, scenario, runtime, serve_model, times))
        for name in scenario.variants:
            rows.append(variant_row(name, rate, runs[name], scenario))
            log(describe(rows[-1]))
    runtime.reschedule(interval=scenario.interval)
    return rows


def build(scenario: Scenario, log: Callable[[str], None]) -> tuple[Any, DigitsServeModel]:
    """Returns the runtime with the graph pairs of every batch size built (not timed), and the model."""
    model = load_model()
    serve_model = DigitsServeModel(model)
    runtime = dcfx.compile(model.unet, branch=scenario.branch, interval=scenario.interval, forecast=scenario.forecast)
    log("building the graph pairs of every batch size (not timed) ...")
    Engine(runtime, serve_model, EngineConfig(max_batch=scenario.max_batch)).warmup(request_for(0, scenario.steps))
    return runtime, serve_model


def run_variant(
    name: str, scenario: Scenario, runtime: Any, serve_model: DigitsServeModel, times: Sequence[float]
) -> dict[str, Any]:
    """Returns one run of a variant on the arrivals ``times``: spans, engine counters, load, core share."""
    interval, config = variant_setup(name, scenario)
    runtime.reschedule(interval=interval)  # the same graphs serve every schedule of the branch
    engine = Engine(runtime, serve_model, config)
    load_before = os.getloadavg()[0]
    spans, share, waits = drive(engine, times, scenario.steps)
    return {
        "spans": spans,
        "stats": engine.stats(),
        "load": [load_before, os.getloadavg()[0]],
        "core_share": share,
        "waits": waits,
    }


def variant_row(name: str, rate: float, runs: Sequence[dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    row = {"variant": name, **summarize([r["spans"] for r in runs], rate, scenario.warmup_requests)}
    totals: dict[str, Any] = {}
    for r in runs:
        for key, value in engine_summary(r["stats"]).items():
            totals.setdefault(key, []).append(value)
    row.update({k: statistics.fmean(v) for k, v in totals.items()})
    row["load_avg_1m"] = [min(r["load"][0] for r in runs), max(r["load"][1] for r in runs)]
    row["core_share"] = min(r["core_share"] for r in runs)
    row.update(wait_summary([w for r in runs for w in r["waits"][scenario.warmup_requests :]]))
    return row


def wait_summary(waits: Sequence[tuple[int, float, float]]) -> dict[str, float]:
    """Returns the admission waits of counted requests: ticks (mean, max) and seconds (mean, p99).

    ``wait_s``: from submission to the first step (alignment, a full cohort, the queue);
    ``tick_in_flight_s``: from arrival to submission (the tick that was running).
    """
    ticks, seconds, in_flight = (sorted(column) for column in zip(*waits, strict=True))
    return {
        "wait_ticks_mean": statistics.fmean(ticks),
        "wait_ticks_max": ticks[-1],
        "wait_s_mean": statistics.fmean(seconds),
        "wait_s_p99": percentile(seconds, 99),
        "tick_in_flight_s_p99": percentile(in_flight, 99),
    }


def describe(row: dict[str, Any]) -> str:
    text = (
        f"rate {row['offered_rate']:5.2f}/s {row['variant']:24s} throughput {row['throughput']:5.2f}/s  "
        f"p50 {row['p50_s']:6.2f} s  p99 {row['p99_s']:6.2f} s  {'keeps up' if row['keeps_up'] else 'falls behind'}"
    )
    if "full_calls" in row:
        text += (
            f"  (full {row['full_calls']:.0f} x {row['mean_full_rows']:.1f} rows, shallow {row['shallow_calls']:.0f} x "
            f"{row['mean_shallow_rows']:.1f}; core share >= {row['core_share']:.2f})"
        )
    if "wait_ticks_mean" in row:
        text += f"  wait {row['wait_ticks_mean']:.1f} ticks, p99 {row['wait_s_p99'] * 1e3:.0f} ms"
    return text


def run_ray(
    scenario: Scenario, runtime: Any, serve_model: DigitsServeModel, log: Callable[[str], None]
) -> dict[str, Any]:
    """Returns dcfx at ``scenario.ray_rate`` through Ray Serve's HTTP path and in-process, runs alternating.

    Each request's HTTP + Ray overhead is its latency at the client less its latency inside the
    replica's engine (from submit to the last step, the ``x-dcfx-latency-s`` header): a
    difference measured on the same request, so the machine's load cancels out of it.
    """
    import urllib.request

    from dcfx.serve.app import ServeApp, ServeOptions

    rate = scenario.ray_rate
    options = ServeOptions(
        replicas=1,
        max_batch=scenario.max_batch,
        max_queue=100_000,
        branch=scenario.branch,
        interval=scenario.interval,
        forecast=scenario.forecast,
        threads=scenario.threads,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = ServeApp(options, port=port)
    log("starting Ray Serve (one replica) ...")
    started = time.perf_counter()
    url = app.start(ray_init={"log_to_driver": False}) + "/generate"
    startup_s = time.perf_counter() - started
    log(f"  ready in {startup_s:.0f} s")

    def post(i: int) -> tuple[float, float]:
        body = json.dumps({"label": i % 10, "seed": i, "steps": scenario.steps, "output": "latents"}).encode()
        request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            r.read()
            assert r.status == 200
            return time.perf_counter(), float(r.headers["x-dcfx-latency-s"])

    local_runs, remote_runs, overheads = [], [], []
    try:
        for i in range(3):  # warm the path: proxy, router, replica
            post(i)
        for repeat in range(scenario.repeats):
            times = arrivals(rate, scenario.requests_at(rate), scenario.seed + repeat)
            local_runs.append(run_variant("dcfx", scenario, runtime, serve_model, times))
            start = time.perf_counter()
            with ThreadPoolExecutor(len(times)) as pool:
                futures = []
                for i, t in enumerate(times):
                    time.sleep(max(0.0, start + t - time.perf_counter()))
                    futures.append(pool.submit(post, i))
                answers = [f.result() for f in futures]
            spans = [(start + t, finish) for t, (finish, _) in zip(times, answers, strict=True)]
            remote_runs.append(spans)
            counted = zip(spans[scenario.warmup_requests :], answers[scenario.warmup_requests :], strict=True)
            overheads += [(finish - arrival) - inside for (arrival, finish), (_, inside) in counted]
    finally:
        app.stop()
    local = {**variant_row("dcfx", rate, local_runs, scenario), "variant": "dcfx in-process"}
    remote = {"variant": "dcfx via Ray Serve HTTP", **summarize(remote_runs, rate, scenario.warmup_requests)}
    ordered = sorted(overheads)
    remote.update(overhead_p50_s=percentile(ordered, 50), overhead_p99_s=percentile(ordered, 99), startup_s=startup_s)
    log(describe(local))
    log(describe(remote) + f"  (HTTP + Ray per request: p50 {remote['overhead_p50_s'] * 1e3:.1f} ms)")
    return {"in_process": local, "http": remote}


def throughput_at(rows: Sequence[dict[str, Any]], bound: float) -> tuple[float | None, float | None]:
    """Returns a variant's throughput at p99 = ``bound``: the best measured rate within it, and interpolated.

    ``rows`` are the variant's runs in rising rate. The interpolated value follows the curve
    linearly from the last kept-up point within the bound to the next kept-up point beyond it.
    """
    kept = [r for r in rows if r["keeps_up"]]
    within = [r for r in kept if r["p99_s"] <= bound]
    if not within:
        return None, None
    best = max(within, key=lambda r: r["throughput"])
    beyond = [r for r in kept if r["offered_rate"] > best["offered_rate"] and r["p99_s"] > bound]
    if not beyond:
        return best["throughput"], best["throughput"]
    nxt = beyond[0]
    share = (bound - best["p99_s"]) / (nxt["p99_s"] - best["p99_s"])
    return best["throughput"], best["throughput"] + share * (nxt["throughput"] - best["throughput"])


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Returns the goal's checks as sentences: 2x one-at-a-time at equal p99; p99 below request batching."""
    by = {(r["variant"], r["offered_rate"]): r for r in rows}
    rates = sorted({r["offered_rate"] for r in rows})
    lines = []

    def curve(variant: str) -> list[dict[str, Any]]:
        return [by[(variant, q)] for q in rates if (variant, q) in by]

    one = [r for r in curve("one-at-a-time") if r["keeps_up"]]
    if one and curve("dcfx"):
        for base in one:
            bound = base["p99_s"]
            grid, smooth = throughput_at(curve("dcfx"), bound)
            if grid is None:
                lines.append(f"- At p99 <= {bound:.2f} s: dcfx kept up at no measured rate within it.")
                continue
            met = "met" if smooth >= 2 * base["throughput"] else "NOT met"
            lines.append(
                f"- At p99 <= {bound:.2f} s (one-at-a-time's at {base['offered_rate']:g}/s, where it serves "
                f"{base['throughput']:.2f}/s): dcfx {smooth:.2f}/s on its curve ({grid:.2f}/s at a measured rate), "
                f"{smooth / base['throughput']:.2f}x (goal >= 2x: {met})."
            )
    both = [
        q
        for q in rates
        if ("dcfx", q) in by
        and ("request-batching", q) in by
        and by[("dcfx", q)]["keeps_up"]
        and by[("request-batching", q)]["keeps_up"]
    ]
    if both:
        worse = [q for q in both if by[("dcfx", q)]["p99_s"] >= by[("request-batching", q)]["p99_s"]]
        cells = ", ".join(
            f"{q:g}/s: {by[('dcfx', q)]['p99_s']:.2f} vs {by[('request-batching', q)]['p99_s']:.2f} s" for q in both
        )
        met = "met" if not worse else f"NOT met at {', '.join(f'{q:g}/s' for q in worse)}"
        lines.append(f"- p99 of dcfx vs request-level batching where both keep up ({cells}): {met}.")
    for q in rates:
        kept = [by[(v, q)] for v in VARIANTS if (v, q) in by and by[(v, q)]["keeps_up"]]
        if kept:
            best = min(kept, key=lambda r: r["p99_s"])
            lines.append(
                f"- {q:g}/s: lowest p99 among the variants that keep up: {best['variant']} ({best['p99_s']:.2f} s)."
            )
    return lines


def write_markdown(result: dict[str, Any], path: Path) -> None:
    s = result["scenario"]
    machine, soft = result["machine"], result["versions"]
    lines = [
        "# Serving load: step batching with DeepCache phase alignment",
        "",
        f"Bundled digits model, one digit per request, {s['steps']} DDIM steps, branch {s['branch']}, "
        f"1:{s['interval']}, forecast {s.get('forecast', 'none')} (no-cache: every step full), "
        f"max_batch {s['max_batch']}, calls padded to powers of two, "
        f"eager, {s['threads']} torch thread(s). Poisson arrivals; latency from arrival to the last step; throughput "
        f"= departure rate; the first {s['warmup_requests']} requests of each run not counted. Each rate ran "
        f"{s['repeats']} times per variant, the variants in a shuffled order each time on the same arrivals "
        "(latencies pooled, throughput averaged). Core share: the engine thread's CPU time over the wall time of "
        "its ticks (the lowest of the runs; 1.0 = the core was ours). Calls and padded rows per run, mean live rows "
        "per call. Admission wait: engine ticks from a request's submission to its first step (alignment with its "
        "cohort's full step, or a full cohort), and those ticks' seconds (p99 of the counted requests).",
        "",
        f"Machine: {machine['cpu_count']} CPU cores ({machine['processor']}), load average (1 min) "
        f"{machine['load_avg_start'][0]:.1f} at the start and {machine['load_avg_end'][0]:.1f} at the end (the cores "
        f"are shared); torch {soft['torch']}, diffusers {soft['diffusers']}, ray {soft.get('ray', '-')}. "
        "Wall time "
        f"{result['wall_s'] / 60:.1f} min.",
        "",
        "| rate (req/s) | variant | throughput (req/s) | p50 (s) | p99 (s) | keeps up | full calls x rows | "
        "shallow calls x rows | padded rows | cache copies | admission wait: ticks mean / max, p99 (s) | "
        "core share | load |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        calls = (
            f"{r['full_calls']:.0f} x {r['mean_full_rows']:.1f} | {r['shallow_calls']:.0f} x "
            f"{r['mean_shallow_rows']:.1f} | {r['padded_rows']:.0f} | {r['cache_copies']:.0f} | "
            f"{r['wait_ticks_mean']:.1f} / {r['wait_ticks_max']:.0f}, {r['wait_s_p99']:.3f} | {r['core_share']:.2f}"
        )
        lines.append(
            f"| {r['offered_rate']:g} | {r['variant']} | {r['throughput']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
            f"{'yes' if r['keeps_up'] else 'no'} | {calls} | {r['load_avg_1m'][0]:.1f}-{r['load_avg_1m'][1]:.1f} |"
        )
    lines += ["", "## The goal", "", *result["verdict"], ""]
    if result.get("ray"):
        local, remote = result["ray"]["in_process"], result["ray"]["http"]
        lines += [
            "## Ray Serve HTTP path",
            "",
            f"At {remote['offered_rate']:g}/s, one replica ({s['threads']} torch thread), JSON in and latents (base64) "
            f"out, a client thread per request, {remote['runs']} runs alternating with the engine in-process on the "
            "same arrivals:",
            "",
            "| path | throughput (req/s) | p50 (s) | p99 (s) |",
            "| --- | ---: | ---: | ---: |",
            f"| engine in-process | {local['throughput']:.2f} | {local['p50_s']:.2f} | {local['p99_s']:.2f} |",
            f"| Ray Serve HTTP | {remote['throughput']:.2f} | {remote['p50_s']:.2f} | {remote['p99_s']:.2f} |",
            "",
            f"HTTP + Ray Serve per request (latency at the client less latency inside the replica's engine, the "
            f"same request): p50 {remote['overhead_p50_s'] * 1e3:.1f} ms, p99 {remote['overhead_p99_s'] * 1e3:.1f} ms. "
            f"Start-up (local Ray instance, Serve, one replica loading and building its graphs): "
            f"{remote['startup_s']:.0f} s.",
            "",
        ]
    path.write_text("\n".join(lines))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in ((axes[0], "p50_s", "p50 latency"), (axes[1], "p99_s", "p99 latency")):
        for variant in VARIANTS:
            rows = [r for r in result["rows"] if r["variant"] == variant]
            if not rows:
                continue
            ax.plot([r["throughput"] for r in rows], [r[key] for r in rows], marker="o", label=variant)
            for r in rows:
                if not r["keeps_up"]:
                    ax.plot(r["throughput"], r[key], marker="x", color="black", markersize=9)
        if result.get("ray"):
            remote = result["ray"]["http"]
            ax.plot(remote["throughput"], remote[key], "k*", markersize=14, label="dcfx via Ray Serve HTTP")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("digits model, 50 DDIM steps, 1:5 branch 0; x: the run fell behind its offered rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions() -> dict[str, str]:
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "dcfx": dcfx.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="2,5,8,12,16", help="offered rates, requests per second")
    parser.add_argument("--seconds-per-rate", type=float, default=12.0)
    parser.add_argument("--min-requests", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs per rate and variant")
    parser.add_argument("--max-requests", type=int, default=90)
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--forecast", default="none", help="what shallow steps read: none (reuse) or linear")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine and Ray replica)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ray-rate", type=float, default=5.0, help="rate of the Ray Serve HTTP run (0: skip it)")
    parser.add_argument("--out", default="docs/benchmarks/serve")
    args = parser.parse_args(argv)
    variants = tuple(args.variants.split(","))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    scenario = Scenario(
        rates=tuple(float(r) for r in args.rates.split(",")),
        seconds_per_rate=args.seconds_per_rate,
        min_requests=args.min_requests,
        max_requests=args.max_requests,
        repeats=args.repeats,
        warmup_requests=args.warmup_requests,
        steps=args.steps,
        interval=args.interval,
        forecast=args.forecast,
        max_batch=args.max_batch,
        threads=args.threads,
        variants=variants,
        ray_rate=args.ray_rate or None,
    )
    torch.set_num_threads(scenario.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    load_start = os.getloadavg()
    runtime, serve_model = build(scenario, log)
    rows = run_engine_variants(scenario, runtime, serve_model, log)
    ray_rows = run_ray(scenario, runtime, serve_model, log) if scenario.ray_rate else None
    result = {
        "scenario": dataclasses.asdict(scenario),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        },
        "versions": versions(),
        "rows": rows,
        "ray": ray_rows,
        "verdict": verdict(rows),
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "serve_load.md")
    plot(result, out / "serve_load.png")
    print("\n".join(result["verdict"]))
    log(f"wrote {out}/serve_load.json, serve_load.md, serve_load.png in {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
