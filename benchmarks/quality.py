"""DeepCache's quality on the bundled digits model: the paper's kind of metrics, offline.

Generates the same digits (20 per class by default, same seeds, 50 DDIM steps; classifier-free
guidance optional, off by default: the bundled model is best without) without cache and with
dcfx at N in 2, 3, 5, 10 for several branches, uniform and non-uniform, and with the paper's
baseline: no cache at fewer steps, as many as the same FLOPs buy (round(full + shallow r)
steps). Per configuration:

- PSNR of each image against the no-cache image of the same seed (mean over images);
- accuracy: share of images the bundled classifier reads as the requested digit (CLIP score analog);
- Frechet distance of the classifier's features against all 1797 real digits (FID analog);
- the FLOP-ideal speedup and the measured time of the denoising loop (one run: indicative only,
  the speed benchmark is benchmarks/pipeline_speed.py).

Writes JSON (with machine, versions and settings), a markdown table, metric plots against N and a
PNG grid per shown configuration (no cache and DeepCache side by side).

Usage:
    python benchmarks/quality.py                     # about 25 min on 2 CPU cores
    python benchmarks/quality.py --per-class 2 --intervals 2,5 --branches 0 --out /tmp/q   # a smoke run
"""

from __future__ import annotations

import argparse
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
from dcfx.branches import ideal_speedup_of_counts
from dcfx.demo import save_grid
from dcfx.digits import IMAGE_SIZE, NUM_CLASSES, generate, load_classifier, load_model
from dcfx.quality import accuracy, feature_stats, frechet_distance, psnr
from dcfx.schedule import full_step_indices


@dataclass(frozen=True)
class Scenario:
    """What is generated and compared."""

    steps: int = 50
    guidance: float = 1.0
    per_class: int = 20
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    branches: tuple[int, ...] = (0, 1, 2, 3)
    schedules: tuple[str, ...] = ("uniform", "non-uniform")
    center: int = 15
    power: float = 1.4
    seed: int = 0
    grids: tuple[tuple[int, int], ...] = ((0, 5), (0, 10), (3, 10))  # (branch, N) shown as images

    def __post_init__(self) -> None:
        if self.steps < 2 or self.per_class < 1:
            raise ValueError(f"need steps >= 2 and per_class >= 1, got {self.steps}, {self.per_class}")
        if not self.intervals or min(self.intervals) < 2:
            raise ValueError(f"intervals must be >= 2, got {self.intervals}")
        bad = [s for s in self.schedules if s not in ("uniform", "non-uniform")]
        if bad or not self.schedules:
            raise ValueError(f"schedules must be uniform and/or non-uniform, got {self.schedules}")


def log(message: str) -> None:
    tqdm.write(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


class Scorer:
    """Scores a set of generated digits against the no-cache set and the real digits."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.classifier, self.real_mean, self.real_cov = load_classifier()
        self.reference: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        """Returns PSNR against the reference set (once set), accuracy and the Frechet distance."""
        feats = self.classifier.features(images)
        mean, cov = feature_stats(feats)
        scores = {
            "accuracy": accuracy(self.classifier.head(feats), self.labels),
            "fd": frechet_distance(mean, cov, self.real_mean, self.real_cov),
        }
        if self.reference is not None:
            values = psnr(images, self.reference)
            finite = values[torch.isfinite(values)]
            scores["psnr"] = finite.mean().item() if len(finite) else float("inf")
            scores["identical_images"] = int((~torch.isfinite(values)).sum())
        return scores


def run(scenario: Scenario, out: Path) -> list[dict[str, Any]]:
    """Returns one row per configuration; writes the grids into ``out``."""
    model = load_model()
    labels = torch.arange(NUM_CLASSES).repeat(scenario.per_class)
    scorer = Scorer(labels)
    scheduler = model.scheduler()
    batch = len(labels) * (2 if scenario.guidance > 1 else 1)
    infos = dcfx.branches(model.unet, (batch, 1, IMAGE_SIZE, IMAGE_SIZE))
    bad = [b for b in scenario.branches if b >= len(infos)]
    if bad:
        raise ValueError(f"branch(es) {bad} out of range for the digits model; valid: 0..{len(infos) - 1}")

    def timed(unet: torch.nn.Module, steps: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images = generate(
            unet, model.tokens, scheduler, labels, steps=steps, guidance=scenario.guidance, seed=scenario.seed
        )
        return images, time.perf_counter() - start

    n_configs = 1 + len(scenario.branches) * len(scenario.intervals) * (len(scenario.schedules) + 1)
    bar = tqdm(total=n_configs, desc="configurations", file=sys.stderr)
    base, base_s = timed(model.unet, scenario.steps)
    rows = [{"method": "no cache", "steps": scenario.steps, "loop_s": base_s, **scorer(base)}]
    scorer.reference = base
    bar.update()
    fewer_steps: dict[int, dict[str, Any]] = {}
    for branch in scenario.branches:
        r = infos[branch].flop_share
        fast = dcfx.compile(model.unet, branch=branch, interval=2, scheduler=scheduler)
        generate(fast, model.tokens, scheduler, labels[:1], steps=2, seed=scenario.seed)  # builds the graphs
        for schedule in scenario.schedules:
            for n in scenario.intervals:
                extra = {"center": scenario.center, "power": scenario.power} if schedule == "non-uniform" else {}
                cfg = dcfx.DeepCacheConfig(branch=branch, interval=n, schedule=schedule, **extra)
                full = len(full_step_indices(cfg, scenario.steps))
                images, seconds = timed(fast.reschedule(cfg), scenario.steps)
                row = {
                    "method": f"dcfx {schedule}",
                    "branch": branch,
                    "interval": n,
                    "r": r,
                    "steps": scenario.steps,
                    "full_steps": full,
                    "ideal": ideal_speedup_of_counts(full, scenario.steps - full, r),
                    "loop_s": seconds,
                    "speedup_measured": base_s / seconds,
                    **scorer(images),
                }
                rows.append(row)
                if schedule == "uniform" and (branch, n) in scenario.grids:
                    title = f"dcfx branch {branch}, 1:{n} uniform ({row['psnr']:.1f} dB)"
                    save_grid([("no cache", base), (title, images)], NUM_CLASSES, out / f"grid_b{branch}_n{n}.png")
                bar.update()
            if schedule == "uniform":
                for n in scenario.intervals:
                    full = len(full_step_indices(dcfx.DeepCacheConfig(branch=branch, interval=n), scenario.steps))
                    steps = max(1, round(full + (scenario.steps - full) * r))
                    if steps not in fewer_steps:
                        images, seconds = timed(model.unet, steps)
                        fewer_steps[steps] = {"loop_s": seconds, **scorer(images)}
                    rows.append(
                        {
                            "method": "fewer steps",
                            "branch": branch,
                            "interval": n,
                            "r": r,
                            "steps": steps,
                            "ideal": scenario.steps / steps,
                            "speedup_measured": base_s / fewer_steps[steps]["loop_s"],
                            **fewer_steps[steps],
                        }
                    )
                    bar.update()
        log(f"branch {branch} (r = {r:.3f}) done")
    bar.close()
    return rows


def markdown(scenario: Scenario, rows: list[dict[str, Any]]) -> str:
    """Returns the table, one line per configuration, grouped by branch."""
    base = rows[0]
    lines = [
        f"# DeepCache quality on the bundled digits model: {scenario.per_class * NUM_CLASSES} digits, "
        f"{scenario.steps} DDIM steps, guidance {scenario.guidance}",
        "",
        f"No cache: accuracy {base['accuracy']:.1%}, Frechet distance {base['fd']:.2f}, loop {base['loop_s']:.1f} s.",
        "",
        "| branch | N | method | steps (full) | FLOP-ideal speedup | PSNR dB vs no cache | accuracy | FD "
        "| loop s (one run) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows[1:]:
        full = f" ({row['full_steps']})" if "full_steps" in row else ""
        lines.append(
            f"| {row['branch']} | {row['interval']} | {row['method']} | {row['steps']}{full} | {row['ideal']:.2f}x "
            f"| {row['psnr']:.1f} | {row['accuracy']:.1%} | {row['fd']:.2f} | {row['loop_s']:.1f} |"
        )
    lines += [
        "",
        "- PSNR: mean over images of each image against the no-cache image of the same seed and digit "
        "(pixel range [-1, 1], so data range 2); identical images are left out of the mean.",
        "- accuracy: the bundled classifier's reading equals the requested digit (the CLIP score's analog).",
        "- FD: Frechet distance of the classifier's 64-d features against those of all 1797 real digits "
        f"(FID's analog); {scenario.per_class * NUM_CLASSES} generated digits, so it carries a small-sample bias "
        "shared by every row.",
        "- fewer steps: the paper's baseline, no cache with as many DDIM steps as the same FLOPs buy: "
        "round(full + shallow r).",
        f"- non-uniform: the paper's schedule around center {scenario.center} with power {scenario.power}.",
    ]
    return "\n".join(lines)


def plot(scenario: Scenario, rows: list[dict[str, Any]], path: Path) -> None:
    """Writes PSNR, accuracy and FD against N: a line per branch and method, no cache as a grey line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    styles = {"dcfx uniform": "o-", "dcfx non-uniform": "s:", "fewer steps": "x--"}
    for ax, metric, label in zip(
        axes,
        ("psnr", "accuracy", "fd"),
        ("PSNR dB vs no cache", "classifier accuracy", "Frechet distance"),
        strict=True,
    ):
        for i, branch in enumerate(scenario.branches):
            for method, style in styles.items():
                pts = sorted(
                    (r["interval"], r[metric]) for r in rows[1:] if r["branch"] == branch and r["method"] == method
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=f"b{branch} {method}")
        if metric != "psnr":
            ax.axhline(rows[0][metric], color="grey", lw=1, label="no cache")
        ax.set(xlabel="N (1:N)", ylabel=label)
        ax.set_xticks(scenario.intervals)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=6, ncol=2)
    fig.suptitle(f"bundled digits model, {scenario.steps} DDIM steps, {scenario.per_class * NUM_CLASSES} digits")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--per-class", type=int, default=d.per_class)
    p.add_argument("--intervals", default=",".join(map(str, d.intervals)))
    p.add_argument("--branches", default=",".join(map(str, d.branches)))
    p.add_argument("--schedules", default=",".join(d.schedules))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    args = p.parse_args(argv)
    scenario = Scenario(
        steps=args.steps,
        guidance=args.guidance,
        per_class=args.per_class,
        intervals=tuple(int(x) for x in args.intervals.split(",")),
        branches=tuple(int(x) for x in args.branches.split(",")),
        schedules=tuple(s.strip() for s in args.schedules.split(",")),
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = run(scenario, args.out)
    result = {"benchmark": "quality", "started": started, "scenario": asdict(scenario), "machine": machine_info()}
    result |= {"rows": rows}
    write_results(args.out, "quality", result, markdown(scenario, rows), lambda path: plot(scenario, rows, path), log)


if __name__ == "__main__":
    main()
