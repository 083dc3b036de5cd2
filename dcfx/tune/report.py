"""What ``dcfx tune`` writes: the summary, the frontier table, results.json, report.md, the plot.

The plot needs matplotlib, which the core install lacks (``pip install "dcfx[plot]"``): without
it ``tune`` says so before it measures anything and writes everything but pareto.png.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcfx.forecast import available_forecasts
from dcfx.tune.cost import SEARCHABLE_SCHEDULES
from dcfx.tune.cuts import cut_name
from dcfx.tune.goal import Goal
from dcfx.tune.measure import Measurement, Rounds

NO_PLOT = 'matplotlib is not installed: no pareto.png this time (pip install "dcfx[plot]" for the plot)'


@dataclass
class TuneResult:
    """What ``tune`` found: every measurement, the Pareto frontier, the choice and its check.

    ``space`` is what was searched beyond the workload: the forecast modes and the step counts.
    """

    workload: dict[str, Any]
    goal: Goal | None
    baseline_s: float
    baseline_spread: float | None
    full_s: float
    measurements: list[Measurement]
    frontier: list[Measurement]
    chosen: Measurement | None
    check: dict[str, Any] | None
    counts: dict[str, int]
    wall_s: float
    out: Path | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    rounds: Rounds = field(default_factory=Rounds)
    space: dict[str, Any] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)


def plotting_available() -> bool:
    """Returns whether matplotlib can be imported (the plot's only extra dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_config(result: TuneResult, path: Path) -> None:
    """Writes the chosen configuration as a DeepCacheConfig JSON (``dcfx.compile(config=path)`` reads it).

    ``tune.steps`` is the step count the choice was measured at: the pipeline must sample with
    it (``num_inference_steps``) for the measured latency and quality to hold.
    """
    chosen = result.chosen
    if chosen is None:
        raise ValueError("no configuration was chosen: there is no config.json to write")
    data = {
        "deepcache": chosen.config,
        "tune": {
            "goal": dataclasses.asdict(result.goal) if result.goal else None,
            "workload": result.workload,
            "steps": chosen.steps,
            "reference_steps": result.workload["steps"],
            "latency_s": chosen.latency_s,
            "latency_spread": chosen.spread,
            "psnr_db": chosen.psnr_db,
            "baseline_s": result.baseline_s,
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def format_spread(spread: float | None) -> str:
    """Returns a latency's spread as text: "2.1%", or "n/a" when unknown."""
    return "n/a" if spread is None else f"{spread:.1%}"


def label(m: Measurement) -> str:
    """Returns a short name of a measured configuration (plot annotations)."""
    if not m.caches:
        return f"no cache, {m.steps} steps"
    c = m.config
    cut = cut_name(c) if c.get("first") is not None else f"b{c['branch']}"
    return f"{cut} N={c['interval']} {c['schedule']} {m.forecast}, {m.steps} steps"


def describe_choice(m: Measurement) -> str:
    """Returns a measured configuration in words: its config, or no cache, and its step count."""
    return f"{m.config if m.caches else 'no cache'} at {m.steps} steps"


def transformer_result(result: TuneResult) -> bool:
    """Returns whether ``result`` searched a transformer's block ranges (not a U-Net's branches)."""
    return any(m.config.get("first") is not None for m in result.measurements)


def frontier_table(result: TuneResult) -> str:
    """Returns the Pareto frontier as a markdown table; ± is the latency's spread.

    The first column is the cut: a U-Net's branch, or a transformer's block range as F<first>B<last>.
    No cache at fewer steps has no cut, schedule or forecast ("-"), N = 1 and r = 1.
    """
    cut = "blocks" if transformer_result(result) else "branch"
    lines = [
        f"| {cut} | N | schedule | forecast | steps | r | predicted s | latency s | ± | speedup | PSNR dB | chosen |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for m in result.frontier:
        c = m.config
        cached = (cut_name(c), c["schedule"], m.forecast) if m.caches else ("-", "no cache", "-")
        lines.append(
            f"| {cached[0]} | {c['interval']} | {cached[1]} | {cached[2]} | {m.steps} | {m.flop_share:.3f} "
            f"| {m.predicted_s:.3f} | {m.latency_s:.3f} | {format_spread(m.spread)} "
            f"| {m.speedup(result.baseline_s):.2f}x | {m.psnr_db:.1f} | {'**yes**' if m is result.chosen else ''} |"
        )
    return "\n".join(lines)


def timing_note(result: TuneResult) -> str:
    """Returns how the latencies were measured, and how many did not settle."""
    r, n = result.rounds, result.counts
    note = (
        f"latency: median of {r.min_rounds}-{r.max_rounds} generations per candidate in interleaved rounds, until its "
        f"spread (± = half-width of the median's 90% confidence interval, relative) is within {r.tolerance:.1%}"
    )
    if n.get("measured"):
        note += f"; {n.get('rounds', 0)} rounds, {n.get('unsettled', 0)} of {n['measured']} measured did not settle"
    return note


def summary(result: TuneResult) -> str:
    """Returns the tuner's findings as text: counts, the frontier, the choice and its check."""
    w, n = result.workload, result.counts
    lines = [
        f"dcfx tune: {w['model']} ({w['model_class']}), {w['scheduler']}, {w['steps']} steps, batch {w['batch']}, "
        f"{w['size']}x{w['size']}, {w['backend']}, {w['seeds']} calibration seeds",
        f"no cache: {result.baseline_s:.3f} s ± {format_spread(result.baseline_spread)} per generation (plain "
        f"{'transformer' if transformer_result(result) else 'U-Net'}); "
        f"dcfx at N=1 (every step full, the cost model's unit): {result.full_s:.3f} s",
        f"searched: forecast modes {_listed(result.space.get('forecasts'))}; step counts "
        f"{_listed(result.space.get('step_counts'))} (quality always against no cache at {w['steps']} steps)",
        f"candidates {n['candidates']} (no schedule at their step count: {n['no_schedule']}), pruned by the cost "
        f"model {n['pruned']}, measured {n['measured']}, from the cache {n['cached']}; {result.wall_s:.0f} s",
        timing_note(result),
        "Pareto frontier (latency against PSNR to no cache):",
        frontier_table(result),
    ]
    if result.goal is not None:
        lines.append(f"goal: {result.goal.describe()}")
        if result.chosen is None:
            lines.append("no configuration meets the goal (see the frontier for what is reachable)")
        else:
            c = result.chosen
            lines.append(
                f"chosen: {describe_choice(c)} -> {c.latency_s:.3f} s ± {format_spread(c.spread)} "
                f"({c.speedup(result.baseline_s):.2f}x), PSNR {c.psnr_db:.1f} dB"
            )
            if c.steps != w["steps"]:
                lines.append(f"sample with {c.steps} steps, not {w['steps']} (num_inference_steps={c.steps})")
    if result.check is not None:
        k = result.check
        lines.append(
            f"check (fresh run from config.json, timed beside no cache): {k['latency_s']:.3f} s "
            f"± {format_spread(k.get('spread'))} ({k['speedup']:.2f}x), PSNR {k['psnr_db']:.1f} dB; "
            f"against the tuner's measurement {k['latency_error']:+.1%} latency, {k['psnr_error_db']:+.2f} dB; "
            f"against the FLOP cost model {k['prediction_error']:+.1%}"
        )
    return "\n".join(lines)


def _listed(values: Any) -> str:
    return ", ".join(str(v) for v in values) if values else "n/a"


def write_outputs(result: TuneResult, out_dir: Path, plot: bool = True) -> list[str]:
    """Writes results.json, report.md and (``plot``: needs matplotlib) pareto.png into ``out_dir``.

    Returns:
        The names of the files written.
    """
    data = {
        "workload": result.workload,
        "machine": result.machine,
        "goal": dataclasses.asdict(result.goal) if result.goal else None,
        "rounds": dataclasses.asdict(result.rounds),
        "space": result.space,
        "baseline_s": result.baseline_s,
        "baseline_spread": result.baseline_spread,
        "full_s": result.full_s,
        "counts": result.counts,
        "wall_s": result.wall_s,
        "measurements": [dataclasses.asdict(m) for m in result.measurements],
        "frontier": [{"config": m.config, "steps": m.steps} for m in result.frontier],
        "chosen": result.chosen.config if result.chosen else None,
        "chosen_steps": result.chosen.steps if result.chosen else None,
        "check": result.check,
    }
    (out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    figure = ["![Pareto frontier](pareto.png)"] if plot else [f"(no plot: {NO_PLOT})"]
    report = ["# dcfx tune report", "", "```", summary(result), "```", "", *figure, ""]
    report += [
        "## Every measured configuration",
        "",
        frontier_table(dataclasses.replace(result, frontier=sorted(result.measurements, key=lambda m: m.latency_s))),
    ]
    (out_dir / "report.md").write_text("\n".join(report) + "\n")
    written = ["results.json", "report.md"]
    if plot:
        plot_pareto(result, out_dir / "pareto.png")
        written.append("pareto.png")
    return written


def plot_pareto(result: TuneResult, path: Path) -> None:
    """Draws every measured configuration (latency ± spread against PSNR), the frontier and the choice.

    Colour is the cut (branch, or block range), the marker's shape the forecast mode (a square: no cache), its fill
    the schedule (full: uniform, left half: non-uniform); a candidate at fewer steps than the
    reference has a black edge and its step count written beside it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    cached = [m for m in result.measurements if m.caches]
    present = {m.forecast for m in cached}
    modes = [f for f in available_forecasts() if f in present] + sorted(present - set(available_forecasts()))
    modes.sort(key=lambda f: f != "none")  # reuse first: the paper's
    markers = dict(zip(modes, "o^Dv<>p", strict=False))
    present = {m.config["schedule"] for m in cached}
    schedules = [s for s in SEARCHABLE_SCHEDULES if s in present] + sorted(present - set(SEARCHABLE_SCHEDULES))
    fills = dict(zip(schedules, ("full", "left", "bottom", "right", "top"), strict=False))
    colours = plt.get_cmap("tab10")
    cut_names = sorted({cut_name(m.config) for m in cached}, key=lambda n: (len(n), n))
    reference_steps = result.workload["steps"]
    for m in result.measurements:
        if m.caches:
            colour = colours(cut_names.index(cut_name(m.config)) % 10)
            marker, fill = markers.get(m.forecast, "x"), fills.get(m.config["schedule"], "none")
        else:
            colour, marker, fill = "black", "s", "full"
        fewer = m.steps < reference_steps
        xerr = None if m.spread is None else m.latency_s * m.spread
        ax.errorbar(
            m.latency_s,
            m.psnr_db,
            xerr=xerr,
            color=colour,
            marker=marker,
            fillstyle=fill,
            markerfacecoloralt="white",
            markeredgecolor="black" if fewer else colour,
            markeredgewidth=1.4 if fewer else 0.8,
            ms=6,
            alpha=0.8,
            lw=0.8,
        )
        if fewer:
            ax.annotate(str(m.steps), (m.latency_s, m.psnr_db), textcoords="offset points", xytext=(4, 3), fontsize=6)
    kind = "blocks" if transformer_result(result) else "branch"
    for i, name in enumerate(cut_names):
        ax.scatter([], [], color=colours(i % 10), marker="o", s=28, label=f"{kind} {name}")

    def key(**style: Any) -> None:  # a legend entry: a marker with no data
        ax.plot([], [], ls="", ms=6, **style)

    for mode, marker in markers.items():
        key(color="grey", marker=marker, label=f"forecast {mode}")
    for schedule, fill in fills.items():
        key(color="grey", marker="o", fillstyle=fill, markerfacecoloralt="white", label=schedule)
    if any(not m.caches for m in result.measurements):
        key(color="black", marker="s", label="no cache, fewer steps")
    if any(m.steps < reference_steps for m in result.measurements):
        key(color="white", marker="o", mec="black", mew=1.4, label="fewer steps (count beside)")
    front = result.frontier
    ax.plot([m.latency_s for m in front], [m.psnr_db for m in front], "k-", lw=1, label="Pareto frontier")
    ax.axvline(result.baseline_s, color="grey", ls=":", lw=1, label=f"no cache ({result.baseline_s:.2f} s)")
    budget = result.goal.budget_s(result.baseline_s) if result.goal is not None else None
    if budget is not None:
        ax.axvline(budget, color="tab:red", ls="--", lw=1, label="latency goal")
    if result.goal is not None and result.goal.kind == "quality":
        ax.axhline(result.goal.value, color="tab:red", ls="--", lw=1, label="quality goal")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.latency_s], [c.psnr_db], s=220, facecolors="none", edgecolors="tab:red", lw=2, label="chosen")
        ax.annotate(label(c), (c.latency_s, c.psnr_db), textcoords="offset points", xytext=(8, -14), color="tab:red")
    w = result.workload
    ax.set_xlabel(f"latency per generation (s, bars: ± spread of the median), {w['backend']}, batch {w['batch']}")
    ax.set_ylabel("PSNR against no cache (dB)")
    ax.set_title(f"dcfx tune: {w['model']}, {w['scheduler']}, reference {w['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the keys grew with the modes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
