"""Soak: a thousand generations through one dcfx runtime, as a serving process runs it.

One runtime over the bundled digits U-Net serves generations of random resolution, batch, step
count and schedule (rescheduled between generations), with faults mixed in: generations
abandoned after a few steps, reset() mid-generation, and refused calls (bad input) in the
middle of a generation. There are more input signatures than the runtime keeps graph pairs
(MAX_GRAPH_PAIRS), so graphs are evicted and built again throughout.

Checked per generation: the full/shallow step counts equal the schedule's plan, and the
runtime's caches (graph pairs, feature buffers, step plans) stay within their documented
bounds. Every ``--check-every`` generations the output is compared with a fresh runtime's
(exact). Recorded per generation: process RSS. The verdict: the RSS slope after warm-up (once
every signature has been built) and the total growth, against ``--max-growth-mb``.

Writes JSON (machine, versions, settings, the RSS curve), markdown and a PNG of RSS and graph
pairs against generation.

Usage:
    python benchmarks/soak.py                          # 1000 generations, 12 signatures: 15-25 min on 2 CPU cores
    python benchmarks/soak.py --sizes 8,12,16,20       # 8 signatures (the bound): about 2.5 min
    python benchmarks/soak.py --generations 60 --out /tmp/soak   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from graph_speed import machine_info, write_results
from tqdm import tqdm

import dcfx
from dcfx import graphs as graphs_module
from dcfx import planner as planner_module
from dcfx.digits import NUM_CLASSES, load_model
from dcfx.schedule import full_step_indices

SCHEDULES = (
    {"interval": 2},
    {"interval": 3},
    {"interval": 5},
    {"interval": 3, "schedule": "non-uniform", "center": 2, "power": 1.4},
    {"interval": 2, "schedule": "window", "start": 1, "stop": 6},
    {"interval": 1},
)


@dataclass(frozen=True)
class Scenario:
    """What the soak runs."""

    generations: int = 1000
    branch: int = 1
    backend: str = "eager"
    sizes: tuple[int, ...] = (8, 12, 14, 16, 20, 24)  # 14 is not a multiple of the down factor 4
    batches: tuple[int, ...] = (1, 2)
    min_steps: int = 4
    max_steps: int = 12
    abandon_rate: float = 0.05
    reset_rate: float = 0.02
    bad_call_rate: float = 0.02
    check_every: int = 100
    warmup: int = 100
    max_growth_mb: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 1 or self.warmup >= self.generations:
            raise ValueError(f"need generations >= 1 and warmup < generations, got {self.generations}, {self.warmup}")
        if self.min_steps < 2 or self.max_steps < self.min_steps:
            raise ValueError(f"need 2 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")


def rss_mb() -> float:
    """Returns this process's resident set size in MB (Linux /proc; ru_maxrss elsewhere)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(fast, model, labels, size, steps, seed, stop_at=None, on_step=None):
    """A DDIM generation through ``fast``; returns the final sample, or None when abandoned."""
    scheduler = fast.scheduler
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, size, size, generator=g)
    cond = model.tokens(labels)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if i == stop_at:
                return None
            if on_step is not None:
                on_step(i)
            eps = fast(x, t, encoder_hidden_states=cond).sample
            x = scheduler.step(eps, t, x).prev_sample
    return x


def run(scenario: Scenario, log=print) -> dict[str, Any]:
    """Runs the soak; returns the result (rows per generation and the verdict)."""
    rng = random.Random(scenario.seed)
    model = load_model()
    fast = dcfx.compile(model.unet, branch=scenario.branch, backend=scenario.backend, scheduler=model.scheduler())
    counts = {"abandoned": 0, "reset": 0, "refused": 0, "checked": 0}
    rows = []
    start = time.perf_counter()
    for gen in tqdm(range(scenario.generations), desc="soak", file=sys.stderr):
        size, batch = rng.choice(scenario.sizes), rng.choice(scenario.batches)
        steps = rng.randint(scenario.min_steps, scenario.max_steps)
        schedule = rng.choice(SCHEDULES)
        fast.reschedule(dcfx.DeepCacheConfig(branch=scenario.branch, **schedule))
        labels = torch.tensor([rng.randrange(NUM_CLASSES) for _ in range(batch)])
        roll = rng.random()
        stop_at = rng.randint(1, steps - 1) if roll < scenario.abandon_rate else None
        reset_at = rng.randint(1, steps - 1) if stop_at is None and rng.random() < scenario.reset_rate else None
        bad_at = rng.randint(1, steps - 1) if rng.random() < scenario.bad_call_rate else None

        def on_step(i, reset_at=reset_at, bad_at=bad_at, batch=batch, size=size, labels=labels):
            if i == reset_at:
                fast.reset()
                counts["reset"] += 1
            if i == bad_at:
                try:
                    fast(torch.randn(batch, 3, size, size), 500, encoder_hidden_states=model.tokens(labels))
                except ValueError:
                    counts["refused"] += 1
                else:
                    raise AssertionError("a sample with 3 channels was not refused")

        before = dict(fast.stats)
        out = generate(fast, model, labels, size, steps, gen, stop_at=stop_at, on_step=on_step)
        ran = {k: fast.stats[k] - before[k] for k in before}
        if out is None:
            counts["abandoned"] += 1
        elif reset_at is None:
            want_full = len(full_step_indices(fast.deepcache_config, steps))
            if ran != {"full": want_full, "shallow": steps - want_full}:
                raise AssertionError(f"generation {gen}: ran {ran}, the plan has {want_full} full of {steps}")
        if out is not None and reset_at is None and gen % scenario.check_every == 0:
            ref = dcfx.compile(model.unet, fast.deepcache_config, scheduler=model.scheduler())
            want = generate(ref, model, labels, size, steps, gen)
            if not torch.equal(out, want):
                raise AssertionError(f"generation {gen}: differs from a fresh runtime by {(out - want).abs().max()}")
            counts["checked"] += 1
            del ref
        sizes = {
            "pairs": len(fast._rt.graphs.pairs),
            "buffers": int(fast._state().buffer is not None),
            "plans": len(fast.planner._plans),
        }
        bounds = {"pairs": graphs_module.MAX_GRAPH_PAIRS, "buffers": graphs_module.MAX_GRAPH_PAIRS}
        bounds["plans"] = planner_module.MAX_STEP_PLANS
        over = {k: v for k, v in sizes.items() if v > bounds[k]}
        if over:
            raise AssertionError(f"generation {gen}: caches over their bounds {over} (bounds {bounds})")
        rows.append({"generation": gen, "rss_mb": rss_mb(), "seconds": time.perf_counter() - start, **sizes})
    gc.collect()
    verdict = assess(rows, scenario)
    verdict.update(
        counts, rebuilds=fast.graph_builds, generations=scenario.generations, wall_s=time.perf_counter() - start
    )
    verdict["signatures"] = len(scenario.sizes) * len(scenario.batches)
    log(
        f"{scenario.generations} generations in {verdict['wall_s']:.0f} s: RSS {verdict['rss_start_mb']:.0f} -> "
        f"{verdict['rss_end_mb']:.0f} MB after warm-up ({verdict['growth_mb']:+.1f} MB, slope "
        f"{verdict['slope_mb_per_1000']:+.2f} MB per 1000 generations): {'flat' if verdict['flat'] else 'GROWING'}"
    )
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "scenario": asdict(scenario),
        "max_graph_pairs": graphs_module.MAX_GRAPH_PAIRS,
        "verdict": verdict,
        "rows": rows,
    }


def assess(rows: list[dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    """Returns the memory verdict: growth and least-squares slope of RSS after the warm-up."""
    tail = rows[scenario.warmup :]
    xs = [r["generation"] for r in tail]
    ys = [r["rss_mb"] for r in tail]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs) or 1.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    growth = ys[-1] - ys[0]
    return {
        "rss_first_mb": rows[0]["rss_mb"],
        "rss_start_mb": ys[0],
        "rss_end_mb": ys[-1],
        "rss_max_mb": max(r["rss_mb"] for r in rows),
        "growth_mb": growth,
        "slope_mb_per_1000": slope * 1000,
        "max_pairs": max(r["pairs"] for r in rows),
        "max_buffers": max(r["buffers"] for r in rows),
        "max_plans": max(r["plans"] for r in rows),
        "flat": abs(slope * 1000) <= scenario.max_growth_mb and growth <= scenario.max_growth_mb,
    }


def markdown(result: dict[str, Any]) -> str:
    """Returns the soak's summary as markdown."""
    s, v = result["scenario"], result["verdict"]
    return "\n".join(
        [
            f"# Soak: {v['generations']} generations, digits U-Net, branch {s['branch']}, {s['backend']}",
            "",
            f"Sizes {s['sizes']} x batches {s['batches']} = {v['signatures']} input signatures against a bound of "
            f"{result['max_graph_pairs']} graph pairs; {s['min_steps']}-{s['max_steps']} DDIM steps; "
            f"{len(SCHEDULES)} schedules, rescheduled between generations.",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| wall time | {v['wall_s']:.0f} s |",
            f"| RSS at generation 0 | {v['rss_first_mb']:.0f} MB |",
            f"| RSS after warm-up ({s['warmup']} generations) | {v['rss_start_mb']:.0f} MB |",
            f"| RSS at the end | {v['rss_end_mb']:.0f} MB |",
            f"| growth after warm-up | {v['growth_mb']:+.1f} MB |",
            f"| slope after warm-up | {v['slope_mb_per_1000']:+.2f} MB / 1000 generations |",
            f"| peak RSS | {v['rss_max_mb']:.0f} MB |",
            f"| graph builds (evictions rebuilt) | {v['rebuilds']} |",
            f"| most graph pairs / buffers / step plans held | {v['max_pairs']} / {v['max_buffers']} / "
            f"{v['max_plans']} |",
            f"| generations abandoned / reset mid-way / bad calls refused | {v['abandoned']} / {v['reset']} / "
            f"{v['refused']} |",
            f"| outputs checked equal to a fresh runtime | {v['checked']} |",
            "",
            f"Verdict: **{'flat' if v['flat'] else 'growing'}** (limit {s['max_growth_mb']:.0f} MB of growth and of "
            "slope per 1000 generations after warm-up). Every generation's full/shallow counts matched its plan "
            "and every cache stayed within its bound (the run stops at the first miss).",
        ]
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Draws RSS and graph pairs held against generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    gens = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(gens, [r["rss_mb"] for r in rows], color="tab:blue", lw=1.2, label="process RSS")
    ax.axvline(result["scenario"]["warmup"], color="grey", ls=":", lw=1, label="end of warm-up")
    ax.set_xlabel("generation")
    ax.set_ylabel("RSS (MB)", color="tab:blue")
    low = min(r["rss_mb"] for r in rows)
    ax.set_ylim(0, max(r["rss_mb"] for r in rows) * 1.15 if low > 0 else None)
    twin = ax.twinx()
    twin.step(gens, [r["pairs"] for r in rows], where="post", color="tab:orange", lw=1, label="graph pairs held")
    twin.axhline(result["max_graph_pairs"], color="tab:orange", ls="--", lw=1, label="bound (MAX_GRAPH_PAIRS)")
    twin.set_ylabel("graph pairs", color="tab:orange")
    twin.set_ylim(0, result["max_graph_pairs"] * 1.5)
    v = result["verdict"]
    ax.set_title(
        f"dcfx soak: {v['generations']} generations, {v['signatures']} signatures, {v['rebuilds']} graph builds; "
        f"RSS {v['growth_mb']:+.1f} MB after warm-up"
    )
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generations", type=int, default=Scenario.generations)
    parser.add_argument("--branch", type=int, default=Scenario.branch)
    parser.add_argument("--backend", default=Scenario.backend)
    parser.add_argument("--warmup", type=int, default=Scenario.warmup)
    parser.add_argument("--check-every", type=int, default=Scenario.check_every)
    parser.add_argument("--max-growth-mb", type=float, default=Scenario.max_growth_mb)
    parser.add_argument("--seed", type=int, default=Scenario.seed)
    parser.add_argument("--sizes", default=",".join(map(str, Scenario.sizes)), help="latent sizes, comma-separated")
    parser.add_argument("--batches", default=",".join(map(str, Scenario.batches)), help="batch sizes, comma-separated")
    parser.add_argument(
        "--max-graph-pairs",
        type=int,
        default=graphs_module.MAX_GRAPH_PAIRS,
        help="the runtime's graph-pair bound (lower it to exercise eviction in a short run)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "benchmarks" / "soak")
    args = parser.parse_args(argv)
    graphs_module.MAX_GRAPH_PAIRS = args.max_graph_pairs
    scenario = Scenario(
        sizes=tuple(int(v) for v in args.sizes.split(",")),
        batches=tuple(int(v) for v in args.batches.split(",")),
        generations=args.generations,
        branch=args.branch,
        backend=args.backend,
        warmup=args.warmup,
        check_every=args.check_every,
        max_growth_mb=args.max_growth_mb,
        seed=args.seed,
    )
    result = run(scenario)
    write_results(args.out, "soak", result, markdown(result), lambda path: plot(result, path))
    return 0 if result["verdict"]["flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
