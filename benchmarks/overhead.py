"""The runtime's own cost: per U-Net call, and per generation (the model-change check).

Per call: ``DeepCacheUNet.forward`` over a backend whose graphs return preallocated tensors
(they do no work), so what is timed is dcfx's Python: binding the arguments, the input
signature, step tracking, the graph swap, the output object. Positional and keyword calls,
full and shallow steps alternating as a 1:2 schedule makes them, under ``torch.no_grad()``
as diffusers pipelines call their U-Net.

Per generation: ``ModelWatch.changes()``, the check that the model still holds what its graphs
baked in (``dcfx.watch``), on a U-Net of the chosen configuration with random weights; and
``record()``, which runs once per graph build. Per build too: the copy of the module tree a
capture traces (``dcfx.passes.clone.structural_clone``), plain and with a bound forward on
every module's instance (what ``DeepCacheSDHelper.disable()`` leaves), all of them rebound.

Usage:
    python benchmarks/overhead.py                      # SD1.5 config for the check, digits U-Net for the calls
    python benchmarks/overhead.py --rounds 3 --calls 200 --out /tmp/overhead   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from graph_speed import machine_info, write_results

import dcfx
from dcfx.backends import CompiledPair, register_backend
from dcfx.passes.clone import structural_clone
from dcfx.watch import ModelWatch
from dcfx.zoo import CONFIGS, build_unet


@dataclass(frozen=True)
class Scenario:
    """What is measured."""

    check_model: str = "sd15"  # the U-Net whose model-change check is timed
    rounds: int = 7  # medians over rounds
    calls: int = 990  # U-Net calls per round (per-call timing)
    checks: int = 200  # model checks per round
    batch: int = 2
    size: int = 16
    threads: int = 1

    def __post_init__(self) -> None:
        if self.check_model not in CONFIGS:
            raise ValueError(f"unknown model config {self.check_model!r}; built in: {', '.join(CONFIGS)}")
        if min(self.rounds, self.calls, self.checks) < 1:
            raise ValueError("rounds, calls and checks must be >= 1")


@register_backend("preallocated")
def preallocated(full, shallow, example_inputs, **options) -> CompiledPair:
    """Graphs that do no work: they return tensors allocated once, shaped as the real ones'."""
    sample, feature = full(*example_inputs)
    sample, feature = sample.clone(), feature.clone()
    return CompiledPair(full=lambda *a: (sample, feature), shallow=lambda *a: sample, follows_values=True)


def time_calls(scenario: Scenario) -> dict[str, Any]:
    """Returns the median seconds per call (over rounds) of positional and keyword calls."""
    from dcfx.digits import load_model

    unet = load_model().unet
    runtime = dcfx.compile(unet, branch=0, interval=2, backend="preallocated")
    sample = torch.randn(scenario.batch, unet.config.in_channels, scenario.size, scenario.size)
    states = torch.randn(scenario.batch, 4, unet.config.cross_attention_dim)
    timesteps = [torch.tensor(float(t)) for t in range(999, 999 - scenario.calls, -1)]
    styles = {
        "positional": lambda t: runtime(sample, t, states),
        "keyword": lambda t: runtime(sample=sample, timestep=t, encoder_hidden_states=states),
    }
    wall: dict[str, list[float]] = {k: [] for k in styles}
    cpu: dict[str, list[float]] = {k: [] for k in styles}
    for call in styles.values():
        call(timesteps[0])  # graphs built, buffers allocated: not timed
    with torch.no_grad():
        for _ in range(scenario.rounds):
            for style, call in styles.items():
                runtime.reset()
                start, start_cpu = time.perf_counter(), time.thread_time()
                for t in timesteps:
                    call(t)
                cpu[style].append((time.thread_time() - start_cpu) / len(timesteps))
                wall[style].append((time.perf_counter() - start) / len(timesteps))
    # Wall time is what a step pays; this thread's CPU time is the same work without the waits
    # a loaded host adds (the shared 2-core machine here ran other jobs), so it is quoted too.
    return {
        style: {
            "median_us": statistics.median(wall[style]) * 1e6,
            "rounds_us": [x * 1e6 for x in wall[style]],
            "cpu_median_us": statistics.median(cpu[style]) * 1e6,
            "cpu_rounds_us": [x * 1e6 for x in cpu[style]],
        }
        for style in styles
    }


def time_check(scenario: Scenario) -> dict[str, Any]:
    """Returns the median seconds of one model-change check (and of one record) on the check model."""
    unet = build_unet(scenario.check_model)
    watch = ModelWatch(unet)
    start = time.perf_counter()
    watch.record()
    record_s = time.perf_counter() - start
    rounds, cpu = [], []
    for _ in range(scenario.rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(scenario.checks):
            if watch.changes() is not None:
                raise AssertionError("the model changed while nothing touched it")
        cpu.append((time.thread_time() - start_cpu) / scenario.checks)
        rounds.append((time.perf_counter() - start) / scenario.checks)
    clone_ms = {}
    for state in ("plain", "bound forwards"):
        if state == "bound forwards":
            for m in unet.modules():
                m.forward = types.MethodType(type(m).forward, m)
        times = []
        for _ in range(scenario.rounds):
            start = time.perf_counter()
            structural_clone(unet)
            times.append(time.perf_counter() - start)
        clone_ms[state] = statistics.median(times) * 1e3
    return {
        "modules": len(list(unet.modules())),
        "parameters": len(list(unet.parameters())),
        "clone_median_ms": clone_ms,
        "check_median_ms": statistics.median(rounds) * 1e3,
        "check_rounds_ms": [r * 1e3 for r in rounds],
        "check_cpu_median_ms": statistics.median(cpu) * 1e3,
        "record_ms": record_s * 1e3,
    }


def table(scenario: Scenario, calls: dict[str, Any], check: dict[str, Any]) -> str:
    """Returns the results as markdown."""
    lines = [
        f"dcfx runtime overhead ({datetime.now(timezone.utc):%Y-%m-%d}; median of {scenario.rounds} rounds)",
        "",
        "| what | median (wall) | median (thread CPU time) | per |",
        "|---|---:|---:|---|",
    ]
    for style, v in calls.items():
        lines.append(
            f"| `DeepCacheUNet.forward`, {style} arguments | {v['median_us']:.1f} us | {v['cpu_median_us']:.1f} us "
            "| U-Net call |"
        )
    lines.append(
        f"| model-change check (`ModelWatch.changes`), {scenario.check_model} config, {check['modules']} modules, "
        f"{check['parameters']} parameters | {check['check_median_ms']:.3f} ms | {check['check_cpu_median_ms']:.3f} ms "
        "| generation |"
    )
    lines.append(f"| recording the model state (`ModelWatch.record`) | {check['record_ms']:.0f} ms | | graph build |")
    for state, ms in check["clone_median_ms"].items():
        lines.append(
            f"| the capture's copy of the module tree (`structural_clone`), {state} | {ms:.0f} ms | | graph build |"
        )
    return "\n".join(lines)


def plot(calls: dict[str, Any], check: dict[str, Any], path: Path) -> None:
    """Writes each round's per-call and per-check times, so that the spread shows."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, (style, v) in enumerate(calls.items()):
        left.scatter([i] * len(v["rounds_us"]), v["rounds_us"], label=style)
    left.set_xticks(range(len(calls)), list(calls))
    left.set_ylabel("us per U-Net call")
    left.set_ylim(bottom=0)
    left.set_title("runtime per call (graphs doing no work)")
    right.scatter([0] * len(check["check_rounds_ms"]), check["check_rounds_ms"])
    right.set_xticks([0], ["model check"])
    right.set_ylabel("ms per generation")
    right.set_ylim(bottom=0)
    right.set_title("model-change check")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-model", default=Scenario.check_model, choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=Scenario.rounds)
    parser.add_argument("--calls", type=int, default=Scenario.calls)
    parser.add_argument("--checks", type=int, default=Scenario.checks)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead"))
    args = parser.parse_args(argv)
    scenario = Scenario(check_model=args.check_model, rounds=args.rounds, calls=args.calls, checks=args.checks)
    torch.set_num_threads(scenario.threads)
    calls = time_calls(scenario)
    check = time_check(scenario)
    result = {"scenario": asdict(scenario), "machine": machine_info(), "calls": calls, "check": check}
    write_results(
        args.out,
        "overhead",
        result,
        table(scenario, calls, check),
        lambda p: plot(calls, check, p),
        log_to=lambda m: print(m, file=sys.stderr),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
