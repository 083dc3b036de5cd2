"""Per-call time of the full and shallow graphs, per backend and branch, against the FLOP share r.

DeepCache's promise on a shallow step is the FLOP share r that ``dcfx.branches`` reports. This
benchmark checks how much of it survives as wall time: the time ratio shallow/full of one call,
per backend and branch, next to r. The goal is |ratio / r - 1| <= 0.10.

The model is captured once; each branch is cut from that capture, as ``dcfx.branches`` does.
The full graph does the same work for every branch (only its extra output differs), so it is
timed once per backend, from the first branch listed. Compilation (Inductor compiles on the
first call) is timed on its own and kept out of the per-call times.

Usage:
    python benchmarks/graph_speed.py --model small-sd --repeats 3 --backends eager,inductor --branches 0,1
    python benchmarks/graph_speed.py          # sd15, 32x32 latents, batch 2: Inductor needs ~10 min on 2 cores
    python benchmarks/graph_speed.py --forecast  # and the forecast graph of each branch beside its shallow graph
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import diffusers
import torch
from tqdm import tqdm

import dcfx
from dcfx.backends import available_backends, get_backend
from dcfx.backends.inductor import DEFAULT_INDUCTOR_OPTIONS
from dcfx.branches import count_flops
from dcfx.models import spec_for
from dcfx.passes import GraphPair, PassContext, capture, partition
from dcfx.passes.forecast import add_forecast
from dcfx.zoo import CONFIGS, build_unet

GOAL = 0.10  # |ratio / r - 1| at most this


@dataclass(frozen=True)
class Scenario:
    """What is measured: one built-in U-Net at one input shape, fp32 on the CPU."""

    model: str = "sd15"
    size: int = 32
    batch: int = 2
    backends: tuple[str, ...] = ("eager", "inductor")
    branches: tuple[int, ...] = (0, 1, 2)
    repeats: int = 10
    warmup: int = 2
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads for the run; None: torch's default
    forecast: bool = False  # also time the forecast graph (the shallow graph on f1 + c (f1 - f0))

    def __post_init__(self) -> None:
        if self.model not in CONFIGS:
            raise ValueError(f"unknown model {self.model!r}; built in: {', '.join(CONFIGS)}")
        for backend in self.backends:
            get_backend(backend)
        if not self.backends or not self.branches:
            raise ValueError("give at least one backend and one branch")
        if self.size <= 0 or self.size % 8:
            raise ValueError(f"size must be a positive multiple of 8 (three downsamplings), got {self.size}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if self.batch <= 0 or self.repeats <= 0 or self.warmup < 0:
            raise ValueError(
                f"need batch > 0, repeats > 0, warmup >= 0; got {self.batch}, {self.repeats}, {self.warmup}"
            )

    @property
    def stem(self) -> str:
        """The file name (no suffix) of this scenario's results."""
        return f"{self.model}_latent{self.size}_batch{self.batch}" + ("_forecast" if self.forecast else "")


@dataclass(frozen=True)
class Timing:
    """Wall times of one graph: the first call (compiles, for Inductor) and the timed calls."""

    first_call_s: float
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """The median of the timed calls."""
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        """The fastest timed call."""
        return min(self.times_s)


@dataclass(frozen=True)
class Branch:
    """One branch's graph pair, its FLOP share, and the eager full graph's outputs to feed and check."""

    pair: GraphPair
    up_layer: str
    flop_share: float
    sample: torch.Tensor
    feature: torch.Tensor


def log(message: str) -> None:
    tqdm.write(f"[graph_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def time_graphs(
    graphs: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...]]], scenario: Scenario
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Returns the timing and the first output of each ``fn(*inputs)`` in ``graphs``, by name.

    Every graph gets its first call (the compile) and its warm-up before any timed call. The
    timed calls go round-robin, one per graph per round, so that a change in the machine's
    background load shifts full and shallow times alike and their ratio survives it.
    """
    first_call, outputs = {}, {}
    with torch.no_grad():
        for name, (fn, inputs) in graphs.items():
            log(f"{name}: first call{'' if name.startswith('eager') else ' (compiles)'}")
            start = time.perf_counter()
            outputs[name] = fn(*inputs)
            first_call[name] = time.perf_counter() - start
            log(f"{name}: first call took {first_call[name]:.2f} s")
        for _ in range(scenario.warmup):
            for fn, inputs in graphs.values():
                fn(*inputs)
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in tqdm(range(scenario.repeats), desc="timed rounds", file=sys.stderr, leave=False):
            for name, (fn, inputs) in graphs.items():
                start = time.perf_counter()
                fn(*inputs)
                times[name].append(time.perf_counter() - start)
    return {name: Timing(first_call[name], tuple(times[name])) for name in graphs}, outputs


def prepare(scenario: Scenario) -> tuple[tuple[torch.Tensor, ...], dict[int, Branch]]:
    """Returns the example inputs and every requested branch, cut from one capture."""
    log(f"building {scenario.model} (random weights)")
    unet = build_unet(scenario.model, seed=scenario.seed)
    spec = spec_for(unet)
    layers = spec.up_layers(unet)
    bad = [b for b in scenario.branches if not 0 <= b < len(layers)]
    if bad:
        raise ValueError(f"branch(es) {bad} out of range for {scenario.model}; valid: 0..{len(layers) - 1}")
    torch.manual_seed(scenario.seed)
    shape = (scenario.batch, unet.config.in_channels, scenario.size, scenario.size)
    call = spec.example_call(unet, shape, torch.float32, torch.device("cpu"))
    (names, tensors), _ = spec.flatten(unet, (), call)
    log(f"capturing {scenario.model} at sample shape {shape}")
    captured = capture(unet, names, tensors)
    full_flops = None
    branches = {}
    for b in scenario.branches:
        pair = partition(captured, PassContext(model=unet, spec=spec, input_names=names, layer=layers[b]))
        if full_flops is None:
            full_flops = count_flops(pair.full, *tensors)
        log(f"branch {b}: eager full call for the cache feature")
        with torch.no_grad():
            sample, feature = pair.full(*tensors)
        # count_flops is what dcfx.branches() uses: the same r, without cutting every branch.
        r = count_flops(pair.shallow, *tensors, feature) / full_flops
        branches[b] = Branch(pair, layers[b].path, r, sample, feature)
        log(f"branch {b}: cuts at {layers[b].path}, cache {tuple(feature.shape)}, r = {r:.3f}")
    return tensors, branches


def measure(scenario: Scenario) -> list[dict[str, Any]]:
    """Returns one row per (backend, branch): times, the ratio shallow/full, and r.

    Every backend's graphs are compiled first and then timed in the same round-robin rounds,
    so a drift of the machine's speed (seen here: 2.5x within the hour) hits every backend
    and every graph alike, and both the ratios and the backend comparison survive it.
    """
    tensors, branches = prepare(scenario)
    first = scenario.branches[0]
    graphs: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...]]] = {}
    coefficient = torch.tensor(0.5)
    for backend in scenario.backends:
        compiled = {
            b: get_backend(backend)(
                br.pair.full,
                br.pair.shallow,
                tensors,
                **({"forecast": add_forecast(br.pair.shallow)} if scenario.forecast else {}),
            )
            for b, br in branches.items()
        }
        graphs[f"{backend} full"] = (compiled[first].full, tensors)
        for b, br in branches.items():
            graphs[f"{backend} shallow b{b}"] = (compiled[b].shallow, (*tensors, br.feature))
            if scenario.forecast:
                previous = br.feature * 0.9  # another feature: the forecast moves the input
                inputs = (*tensors, br.feature, previous, coefficient)
                graphs[f"{backend} forecast b{b}"] = (compiled[b].forecast, inputs)
    log(f"full graph from branch {first}, shallow graphs of branches {list(branches)}, backends {scenario.backends}")
    timings, outputs = time_graphs(graphs, scenario)
    eager_full = timings.get("eager full")
    rows = []
    for backend in scenario.backends:
        full = timings[f"{backend} full"]
        full_err = (outputs[f"{backend} full"][0] - branches[first].sample).abs().max().item()
        for b, br in branches.items():
            shallow = timings[f"{backend} shallow b{b}"]
            ratio = shallow.median_s / full.median_s
            rows.append(
                {
                    "backend": backend,
                    "branch": b,
                    "up_layer": br.up_layer,
                    "r": br.flop_share,
                    "full_median_s": full.median_s,
                    "full_min_s": full.min_s,
                    "full_speedup_vs_eager": eager_full.median_s / full.median_s if eager_full else None,
                    "shallow_median_s": shallow.median_s,
                    "shallow_min_s": shallow.min_s,
                    "ratio": ratio,
                    "ratio_over_r": ratio / br.flop_share,
                    "within_goal": abs(ratio / br.flop_share - 1) <= GOAL,
                    "full_compile_s": full.first_call_s,
                    "shallow_compile_s": shallow.first_call_s,
                    "full_times_s": list(full.times_s),
                    "shallow_times_s": list(shallow.times_s),
                    "full_max_abs_err": full_err,
                    "shallow_max_abs_err": (outputs[f"{backend} shallow b{b}"] - br.sample).abs().max().item(),
                }
            )
            if scenario.forecast:
                forecast = timings[f"{backend} forecast b{b}"]
                rows[-1]["forecast_median_s"] = forecast.median_s
                rows[-1]["forecast_over_shallow"] = forecast.median_s / shallow.median_s
                rows[-1]["forecast_times_s"] = list(forecast.times_s)
                rows[-1]["forecast_compile_s"] = forecast.first_call_s
            log(f"{backend} shallow b{b}: median {shallow.median_s:.4f} s, ratio {ratio:.3f}, r {br.flop_share:.3f}")
    return rows


def machine_info() -> dict[str, Any]:
    """Returns the machine, library versions and thread settings the results were taken on."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dcfx": dcfx.__version__,
        "dcfx_commit": commit,
        "torch_num_threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def markdown(scenario: Scenario, rows: list[dict[str, Any]]) -> str:
    """Returns the results as a markdown table with the notes needed to read it."""
    lines = [
        f"{scenario.model}, {scenario.size}x{scenario.size} latents, batch {scenario.batch}, fp32, CPU; "
        f"median of {scenario.repeats} calls after {scenario.warmup} warm-up calls.",
        "",
        "| backend | branch | r | full median s | full vs eager | shallow median s | ratio | ratio/r | within 10% "
        "| compile s full / shallow |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['backend']} | {row['branch']} | {row['r']:.3f} | {row['full_median_s']:.4f} "
            f"| {_speedup(row['full_speedup_vs_eager'])} | {row['shallow_median_s']:.4f} "
            f"| {row['ratio']:.3f} | {row['ratio_over_r']:.2f} "
            f"| {'yes' if row['within_goal'] else 'no'} "
            f"| {row['full_compile_s']:.1f} / {row['shallow_compile_s']:.1f} |"
        )
    lines += [
        "",
        "All graphs of all backends were timed in the same round-robin rounds (drift hits all alike). "
        f"The full graph was timed once per backend, with branch {scenario.branches[0]}'s full graph: the full "
        "graphs of the branches differ only in their extra output.",
        "Compile s is the wall time of the first call (for Inductor: trace, compile and one run; for eager: one run); "
        "Inductor's on-disk caches make a repeated run compile much faster than a cold one.",
        f"Goal: |ratio/r - 1| <= {GOAL:.2f}.",
    ]
    if scenario.forecast:
        lines += [
            "",
            "The forecast graph (the shallow graph reading f1 + c (f1 - f0), c = 0.5), timed in the same rounds:",
            "",
            "| backend | branch | shallow median s | forecast median s | forecast / shallow |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['backend']} | {row['branch']} | {row['shallow_median_s']:.4f} "
                f"| {row['forecast_median_s']:.4f} | {row['forecast_over_shallow']:.3f} |"
            )
    return "\n".join(lines)


def write_results(
    out: Path,
    stem: str,
    result: dict[str, Any],
    table: str,
    plot_to: Callable[[Path], None],
    log_to: Callable[[str], None] | None = None,
) -> None:
    """Writes ``stem``.json (the result), .md (the table) and .png (``plot_to``) into ``out``, and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    plot_to(out / f"{stem}.png")
    print(table)
    (log_to or log)(f"wrote {out / stem}.{{json,md,png}}")


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def plot(scenario: Scenario, rows: list[dict[str, Any]], path: Path) -> None:
    """Writes time ratio against r, one series per backend, with the line y = x."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    top = max(max(r["r"] for r in rows), max(r["ratio"] for r in rows)) * 1.15
    ax.plot([0, top], [0, top], color="grey", lw=1, label="ratio = r")
    ax.fill_between([0, top], [0, top * (1 - GOAL)], [0, top * (1 + GOAL)], color="grey", alpha=0.15, label="±10%")
    for backend in scenario.backends:
        mine = [r for r in rows if r["backend"] == backend]
        ax.plot([r["r"] for r in mine], [r["ratio"] for r in mine], "o", label=backend)
        for r in mine:
            ax.annotate(f"b{r['branch']}", (r["r"], r["ratio"]), textcoords="offset points", xytext=(4, -10))
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="FLOP share r", ylabel="time ratio shallow / full")
    ax.set_title(f"{scenario.model}, {scenario.size}x{scenario.size}, batch {scenario.batch}", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, Path]:
    """Returns the scenario and the output directory given on the command line."""
    default = Scenario()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default.model, choices=sorted(CONFIGS))
    p.add_argument("--size", type=int, default=default.size, help="latent height and width")
    p.add_argument("--batch", type=int, default=default.batch)
    p.add_argument("--backends", default=",".join(default.backends), help=f"of {', '.join(available_backends())}")
    p.add_argument("--branches", default=",".join(map(str, default.branches)))
    p.add_argument("--repeats", type=int, default=default.repeats)
    p.add_argument("--warmup", type=int, default=default.warmup)
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's choice)")
    p.add_argument("--forecast", action="store_true", help="also time each branch's forecast graph")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/graph_speed"))
    args = p.parse_args(argv)
    scenario = Scenario(
        model=args.model,
        size=args.size,
        batch=args.batch,
        backends=tuple(s.strip() for s in args.backends.split(",") if s.strip()),
        branches=tuple(int(s) for s in args.branches.split(",") if s.strip()),
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
        forecast=args.forecast,
    )
    return scenario, args.out


def main(argv: list[str] | None = None) -> None:
    scenario, out = parse_args(argv)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if scenario.threads is not None:
        torch.set_num_threads(scenario.threads)
    machine = machine_info()
    if machine["loadavg"] and machine["loadavg"][0] > 0.5 * (machine["cpu_affinity"] or machine["cpu_count"] or 1):
        log(f"load average {machine['loadavg'][0]:.1f} on {machine['cpu_affinity']} cores: times will be noisy")
    rows = measure(scenario)
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "graph_speed",
        "started": started,
        "scenario": asdict(scenario),
        "settings": {
            "device": "cpu",
            "dtype": "float32",
            "grad": "torch.no_grad",
            "inductor_options": DEFAULT_INDUCTOR_OPTIONS,
            "full_graph_timed_once_per_backend_from_branch": scenario.branches[0],
            "compile_s": "wall time of the first call: trace + compile + one run (eager: one run); "
            "Inductor's on-disk caches, if warm, shorten it",
            "goal": f"|ratio / r - 1| <= {GOAL}",
        },
        "machine": machine,
        "rows": rows,
    }
    write_results(out, scenario.stem, result, markdown(scenario, rows), lambda path: plot(scenario, rows, path))


if __name__ == "__main__":
    main()
