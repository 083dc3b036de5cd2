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

    rates: tuple[float, ...] = (1.5, 3.0, 5.0, 8.0, 12.0)
    seconds_per_rate: float = 15.0  # requests per run: rate x this, within [min_requests, max_requests]
    min_requests: int = 40
    max_requests: int = 90
    warmup_requests: int = 8
    steps: int = 50
    branch: int = 0
    interval: int = 5
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


def drive(engine: Engine, times: Sequence[float], steps: int) -> list[tuple[float, float]]:
    """Runs the arrivals through ``engine`` in this thread; returns each request's (arrival, finish)."""
    start = time.perf_counter()
    futures, submitted = [], 0
    while submitted < len(times) or not all(f.done() for f in futures):
        now = time.perf_counter() - start
        while submitted < len(times) and times[submitted] <= now:
            futures.append(engine.submit(request_for(submitted, steps)))
            submitted += 1
        if not engine.tick() and submitted < len(times):
            time.sleep(max(0.0, times[submitted] - (time.perf_counter() - start)))
    return [(start + t, f.result().finished_s) for t, f in zip(times, futures, strict=True)]


def summarize(spans: Sequence[tuple[float, float]], rate: float, warmup: int) -> dict[str, Any]:
    """Returns throughput, latency percentiles and whether the run kept up with its arrivals."""
    counted = list(spans[warmup:])
    latencies = [f - a for a, f in counted]
    arrived = [a for a, _ in counted]
    finishes = sorted(f for _, f in counted)
    # Departures per second against arrivals per second of the same requests: equal (up to the
    # spread of latencies) when the system keeps up, the service rate when a backlog builds.
    throughput = (len(finishes) - 1) / (finishes[-1] - finishes[0])
    arrival_rate = (len(arrived) - 1) / (arrived[-1] - arrived[0])
    ordered = sorted(latencies)
    return {
        "offered_rate": rate,
        "arrival_rate": arrival_rate,
        "requests": len(spans),
        "counted": len(counted),
        "throughput": throughput,
        "p50_s": percentile(ordered, 50),
        "p99_s": percentile(ordered, 99),
        "mean_s": statistics.fmean(latencies),
        "max_s": ordered[-1],
        "keeps_up": throughput >= KEEP_UP * arrival_rate,
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
        "mean_full_rows": mean_rows(stats["full_rows"]),
        "mean_shallow_rows": mean_rows(stats["shallow_rows"]),
        "padded_rows": stats["padded_rows"],
        "cache_copies": stats["cache_copies"],
    }


def run_engine_variants(scenario: Scenario, log: Callable[[str], None]) -> list[dict[str, Any]]:
    model = load_model()
    serve_model = DigitsServeModel(model)
    runtime = dcfx.compile(model.unet, branch=scenario.branch, interval=scenario.interval)
    probe = request_for(0, scenario.steps)
    log("building the graph pairs of every batch size (not timed) ...")
    Engine(runtime, serve_model, EngineConfig(max_batch=scenario.max_batch)).warmup(probe)
    rows = []
    for rate in scenario.rates:
        times = arrivals(rate, scenario.requests_at(rate), scenario.seed)
        for name in scenario.variants:
            interval, config = variant_setup(name, scenario)
            runtime.reschedule(interval=interval)  # the same graphs serve every schedule of the branch
            engine = Engine(runtime, serve_model, config)
            load_before = os.getloadavg()[0]
            spans = drive(engine, times, scenario.steps)
            row = {"variant": name, **summarize(spans, rate, scenario.warmup_requests)}
            row.update(engine_summary(engine.stats()), load_avg_1m=[load_before, os.getloadavg()[0]])
            rows.append(row)
            log(
                f"rate {rate:5.2f}/s {name:17s} throughput {row['throughput']:5.2f}/s  p50 {row['p50_s']:6.2f} s  "
                f"p99 {row['p99_s']:6.2f} s  {'keeps up' if row['keeps_up'] else 'falls behind'}  "
                f"(full {row['full_calls']} x {row['mean_full_rows']:.1f} rows, shallow {row['shallow_calls']} x "
                f"{row['mean_shallow_rows']:.1f}; load {load_before:.1f})"
            )
    runtime.reschedule(interval=scenario.interval)
    return rows


def run_ray(scenario: Scenario, log: Callable[[str], None]) -> dict[str, Any]:
    """Returns the same measurement at ``scenario.ray_rate`` through Ray Serve's HTTP path."""
    import urllib.request

    from dcfx.serve.app import ServeApp, ServeOptions

    options = ServeOptions(
        replicas=1,
        max_batch=scenario.max_batch,
        max_queue=100_000,
        branch=scenario.branch,
        interval=scenario.interval,
        threads=scenario.threads,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = ServeApp(options, port=port)
    log("starting Ray Serve (one replica) ...")
    started = time.perf_counter()
    url = app.start(ray_init={"log_to_driver": False}) + "/generate"
    log(f"  ready in {time.perf_counter() - started:.0f} s")

    def post(i: int) -> float:
        body = json.dumps({"label": i % 10, "seed": i, "steps": scenario.steps, "output": "latents"}).encode()
        request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            r.read()
            assert r.status == 200
        return time.perf_counter()

    try:
        for i in range(3):  # warm the path: proxy, router, replica
            post(i)
        rate = scenario.ray_rate
        times = arrivals(rate, scenario.requests_at(rate), scenario.seed)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        with ThreadPoolExecutor(len(times)) as pool:
            futures = []
            for i, t in enumerate(times):
                time.sleep(max(0.0, start + t - time.perf_counter()))
                futures.append(pool.submit(post, i))
            spans = [(start + t, f.result()) for t, f in zip(times, futures, strict=True)]
        row = {"variant": "dcfx via Ray Serve HTTP", **summarize(spans, rate, scenario.warmup_requests)}
        row["load_avg_1m"] = [load_before, os.getloadavg()[0]]
        log(
            f"rate {rate:5.2f}/s Ray Serve HTTP     throughput {row['throughput']:5.2f}/s  p50 {row['p50_s']:6.2f} s  "
            f"p99 {row['p99_s']:6.2f} s"
        )
        return row
    finally:
        app.stop()


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Returns the goal's checks as sentences: 2x one-at-a-time at equal p99; p99 below request batching."""
    by = {(r["variant"], r["offered_rate"]): r for r in rows}
    rates = sorted({r["offered_rate"] for r in rows})
    lines = []
    one = [
        by[("one-at-a-time", q)] for q in rates if ("one-at-a-time", q) in by and by[("one-at-a-time", q)]["keeps_up"]
    ]
    if one and any(("dcfx", q) in by for q in rates):
        bound = one[-1]["p99_s"]

        def capacity(variant: str) -> float | None:
            ok = [
                by[(variant, q)]["throughput"]
                for q in rates
                if (variant, q) in by and by[(variant, q)]["keeps_up"] and by[(variant, q)]["p99_s"] <= bound
            ]
            return max(ok) if ok else None

        ours, base = capacity("dcfx"), capacity("one-at-a-time")
        if ours is None or base is None:
            lines.append(
                f"- 2x one-at-a-time at equal p99 ({bound:.2f} s): not measurable (no kept-up rate within it)."
            )
        else:
            met = "met" if ours >= 2 * base else "NOT met"
            lines.append(
                f"- Throughput at p99 <= {bound:.2f} s (one-at-a-time's p99 at the highest rate it keeps up with): "
                f"dcfx {ours:.2f}/s, one-at-a-time {base:.2f}/s: {ours / base:.2f}x (goal >= 2x: {met})."
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
        f"1:{s['interval']} (no-cache: every step full), max_batch {s['max_batch']}, calls padded to powers of two, "
        f"eager, {s['threads']} torch thread(s). Poisson arrivals; latency from arrival to the last step; throughput "
        f"= departure rate; the first {s['warmup_requests']} requests of each run not counted.",
        "",
        f"Machine: {machine['cpu_count']} CPU cores ({machine['processor']}), load average (1 min) "
        f"{machine['load_avg_start'][0]:.1f} at the start and {machine['load_avg_end'][0]:.1f} at the end (the cores "
        f"are shared); torch {soft['torch']}, diffusers {soft['diffusers']}, ray {soft.get('ray', '-')}. "
        "Wall time "
        f"{result['wall_s'] / 60:.1f} min.",
        "",
        "| rate (req/s) | variant | throughput (req/s) | p50 (s) | p99 (s) | keeps up | full calls x rows | "
        "shallow calls x rows | cache copies | load |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        calls = (
            f"{r['full_calls']} x {r['mean_full_rows']:.1f} | {r['shallow_calls']} x {r['mean_shallow_rows']:.1f} | "
            f"{r['cache_copies']}"
            if "full_calls" in r
            else "- | - | -"
        )
        lines.append(
            f"| {r['offered_rate']:g} | {r['variant']} | {r['throughput']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
            f"{'yes' if r['keeps_up'] else 'no'} | {calls} | {r['load_avg_1m'][0]:.1f} |"
        )
    lines += ["", "## The goal", "", *result["verdict"], ""]
    if result.get("ray"):
        ray_row = result["ray"]
        same = next(
            (r for r in result["rows"] if r["variant"] == "dcfx" and r["offered_rate"] == ray_row["offered_rate"]), None
        )
        text = (
            f"Through Ray Serve's HTTP path (one replica, JSON in, latents out) at {ray_row['offered_rate']:g}/s: "
            f"throughput {ray_row['throughput']:.2f}/s, p50 {ray_row['p50_s']:.2f} s, p99 {ray_row['p99_s']:.2f} s"
        )
        if same:
            text += (
                f"; the engine in-process at the same rate: p50 {same['p50_s']:.2f} s, p99 {same['p99_s']:.2f} s "
                f"(HTTP + Ray: {ray_row['p50_s'] - same['p50_s']:+.2f} s at p50)"
            )
        lines += ["## Ray Serve HTTP path", "", text + ".", ""]
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
            ray_row = result["ray"]
            ax.plot(
                ray_row["throughput"], ray_row[key], marker="*", markersize=14, color="black", label="dcfx via Ray HTTP"
            )
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
    parser.add_argument("--rates", default="1.5,3,5,8,12", help="offered rates, requests per second")
    parser.add_argument("--seconds-per-rate", type=float, default=15.0)
    parser.add_argument("--min-requests", type=int, default=40)
    parser.add_argument("--max-requests", type=int, default=90)
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=5)
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
        warmup_requests=args.warmup_requests,
        steps=args.steps,
        interval=args.interval,
        max_batch=args.max_batch,
        threads=args.threads,
        variants=variants,
        ray_rate=args.ray_rate or None,
    )
    torch.set_num_threads(scenario.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    load_start = os.getloadavg()
    rows = run_engine_variants(scenario, log)
    ray_row = run_ray(scenario, log) if scenario.ray_rate else None
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
        "ray": ray_row,
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
