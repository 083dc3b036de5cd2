"""Start-up time and resident memory of a compiled U-Net: per backend, shapes, dynamic, cold and warm.

Each variant runs in a fresh Python process (so its memory and caches are its own): build the
U-Net (random weights, or the bundled digits model), compile it with dcfx, make calls at the
variant's input shapes, and report the time to the first call's result and the process's
resident memory (RSS) after the calls, next to the RSS of the bare model. A warm variant runs
a second process with the same settings and cache directory as the cold one before it.

Variants:
    eager                 one capture per shape
    inductor-1, -3        Inductor (torch.compile, dcfx's default settings: freezing, no weight
                          prepacking, no layout optimisation) at 1 and 3 shapes: a pair per
                          shape, all reading one copy of the weights
    inductor-copy-1, -3   Inductor with freezing as torch sets it up (weight prepacking and layout
                          optimisation on): each pair folds its own copy of the weights
    inductor-nofreeze-3   Inductor without freezing at 3 shapes: the weights are graph inputs
    dynamic               Inductor ahead of time over ranges (dynamic=): one pair for every shape
    aoti-cold, aoti-warm  the dynamic pair persisted in a cache directory (cache_dir=), then loaded

Usage:
    python benchmarks/startup_memory.py --model digits            # minutes
    python benchmarks/startup_memory.py --model sd15 --size 32    # SD1.5 config: minutes per Inductor variant
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from graph_speed import machine_info, write_results

# Inductor settings per variant, over dcfx's defaults (None: the defaults).
INDUCTOR_SETTINGS: dict[str, dict[str, Any] | None] = {
    "inductor-1": None,
    "inductor-3": None,
    "inductor-copy-1": {"cpp.weight_prepack": True, "layout_optimization": True},
    "inductor-copy-3": {"cpp.weight_prepack": True, "layout_optimization": True},
    "inductor-nofreeze-3": {"freezing": False},
}
VARIANTS = ("eager", *INDUCTOR_SETTINGS, "dynamic", "aoti-cold", "aoti-warm")


@dataclass(frozen=True)
class Scenario:
    """What is measured."""

    model: str = "digits"
    size: int = 16  # latent height and width of the first shape; others are +size/2 and +size
    batch: int = 2
    variants: tuple[str, ...] = VARIANTS
    threads: int = 2
    rounds: int = 7  # per-call timing: this many full and shallow calls per shape (medians reported)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")


CHILD = r"""
import json, os, resource, sys, time, torch
torch.set_num_threads(int(os.environ["DCFX_BENCH_THREADS"]))
import dcfx
from dcfx.zoo import load_unet
args = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
unet = load_unet(args["model"]).eval()
with torch.no_grad():
    base = rss()
    sizes = [args["size"], args["size"] + args["size"] // 2, 2 * args["size"]][: args["shapes"]]
    kwargs = dict(branch=0, interval=2)
    if args["backend"] != "eager":
        kwargs["backend"] = "inductor"
    if args["dynamic"]:
        kwargs["dynamic"] = {"batch": (1, 4), "height": (8, 4 * args["size"]), "width": (8, 4 * args["size"])}
    if args["cache_dir"]:
        kwargs["cache_dir"] = args["cache_dir"]
    if args["options"]:
        kwargs["options"] = args["options"]
    start = time.perf_counter()
    runtime = dcfx.compile(unet, **kwargs)
    tokens = 4 if args["model"] == "digits" else 77
    first = None
    for size in sizes:
        x = torch.randn(args["batch"], unet.config.in_channels, size, size)
        ehs = torch.randn(args["batch"], tokens, unet.config.cross_attention_dim)
        for t in (900, 800):
            runtime(x, torch.tensor(t), ehs)
            if first is None:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    rss_after = rss()
    # Steady-state per-call times at each shape: calls alternate full and shallow (interval 2).
    per_call = {}
    for size in sizes:
        x = torch.randn(args["batch"], unet.config.in_channels, size, size)
        ehs = torch.randn(args["batch"], tokens, unet.config.cross_attention_dim)
        times = {"full": [], "shallow": []}
        for t in range(999, 999 - 2 * args["rounds"], -1):
            before = runtime.stats["full"]
            tick = time.perf_counter()
            runtime(x, torch.tensor(t), ehs)
            times["full" if runtime.stats["full"] > before else "shallow"].append(time.perf_counter() - tick)
        per_call[str(size)] = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"first_call_s": first, "all_calls_s": total, "rss_mb": rss_after, "model_rss_mb": base}
    result.update(peak_rss_mb=peak)
    result.update(graph_builds=runtime.graph_builds, shapes=sizes, per_call_ms=per_call)
    print("RESULT " + json.dumps(result))
"""


def run_variant(scenario: Scenario, variant: str, cache_dir: Path) -> dict[str, Any]:
    """Runs one variant in a fresh process; returns its measurements."""
    spec = {
        "model": scenario.model,
        "size": scenario.size,
        "batch": scenario.batch,
        "backend": "eager" if variant == "eager" else "inductor",
        "shapes": 1 if variant.endswith("-1") else 3,
        "options": INDUCTOR_SETTINGS.get(variant),
        "rounds": scenario.rounds,
        "dynamic": variant in ("dynamic", "aoti-cold", "aoti-warm"),
        "cache_dir": str(cache_dir) if variant.startswith("aoti") else None,
    }
    env = {**os.environ, "DCFX_BENCH_THREADS": str(scenario.threads)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-3000:]}")
    return {"variant": variant, **spec, **json.loads(lines[-1][len("RESULT ") :])}


def table(scenario: Scenario, rows: list[dict[str, Any]]) -> str:
    """Returns the results as markdown."""
    lines = [
        f"dcfx start-up and memory: {scenario.model}, batch {scenario.batch}, first size {scenario.size} "
        f"({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        "| variant | shapes | graph builds | first call s | all calls s | RSS MB | of which the model | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {len(r['shapes'])} | {r['graph_builds']} | {r['first_call_s']:.1f} | "
            f"{r['all_calls_s']:.1f} | {r['rss_mb']:.0f} | {r['model_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    sizes = sorted({size for r in rows for size in r["per_call_ms"]}, key=int)
    lines += [
        "",
        f"Per call after the start (median of {scenario.rounds} calls each, ms), full / shallow, "
        f"by latent size (batch {scenario.batch}):",
        "",
        "| variant | " + " | ".join(f"{s}x{s}" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for r in rows:
        cells = [
            f"{r['per_call_ms'][s]['full']:.1f} / {r['per_call_ms'][s]['shallow']:.1f}" if s in r["per_call_ms"] else ""
            for s in sizes
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Writes two bar charts: the first call's time and the resident memory, per variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = [r["variant"] for r in rows]
    left.bar(names, [r["first_call_s"] for r in rows])
    left.set_ylabel("seconds to the first call's result")
    right.bar(names, [r["rss_mb"] for r in rows], label="process")
    right.bar(names, [r["model_rss_mb"] for r in rows], label="the model alone")
    right.set_ylabel("resident memory, MB")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=Scenario.model)
    parser.add_argument("--size", type=int, default=Scenario.size)
    parser.add_argument("--batch", type=int, default=Scenario.batch)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=Scenario.rounds, help="timed full and shallow calls per shape")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup_memory"))
    args = parser.parse_args(argv)
    scenario = Scenario(args.model, args.size, args.batch, tuple(args.variants.split(",")), rounds=args.rounds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dcfx-bench-cache-") as cache:
        for variant in scenario.variants:
            print(f"{variant} ...", file=sys.stderr, flush=True)
            rows.append(run_variant(scenario, variant, Path(cache)))
            print(f"  first call {rows[-1]['first_call_s']:.1f} s, RSS {rows[-1]['rss_mb']:.0f} MB", file=sys.stderr)
    result = {"scenario": asdict(scenario), "machine": machine_info(), "rows": rows, "time": time.time()}
    stem = f"startup_memory_{scenario.model}"
    write_results(args.out, stem, result, table(scenario, rows), lambda p: plot(rows, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
