"""DeepCache's quality on the bundled digits models: the paper's kind of metrics, offline.

Generates the same digits (20 per class by default, same seeds; classifier-free guidance
optional, off by default: the bundled model is best without) with each sampler (DDIM 50,
DPM-Solver++ (2M) 20 and Euler 30 by default) without cache, and through dcfx's runtime (eager,
fp32) at N in 2-10 for several cuts (``--model digits``: the U-Net's skip branches;
``--model digits-dit``: the transformer's block ranges, first F and last B blocks run every
step, written F2B1 as cache-dit does), as

- reuse: the paper's uniform 1:N, shallow steps read the cached feature (``forecast="none"``);
- forecast: uniform 1:N, shallow steps read a first-order forecast from the last two full
  steps (``forecast="linear"``);
- non-uniform: the paper's schedule (reuse), centred at 30% of the steps (15 of 50) with power 1.4;
- fewer steps: the paper's baseline, no cache with as many steps of the same sampler as the
  FLOPs of uniform 1:N buy (round(full + shallow r) steps).

Per configuration:

- PSNR of each image against the no-cache image of the same seed and sampler (mean over images);
- accuracy: share of images the bundled classifier reads as the requested digit (CLIP score analog);
- Frechet distance of the classifier's features against all 1797 real digits (FID analog);
- the FLOP-ideal speedup and the measured time of the denoising loop (one run: indicative only,
  the speed benchmark is benchmarks/pipeline_speed.py).

The samplers are built for this model's schedule: DPM-Solver++ and Euler take
``timestep_spacing="leading"``, as DDIM's own config does. Their default ``linspace`` grid
starts at t = 999, where this model's alpha_bar is 2.4e-9: x0 blows up and the samples saturate.

Writes JSON (with machine, versions and settings), a markdown table, a plot of each method's
quality-vs-speedup frontier (one column per sampler) and PNG grids of chosen configurations
(no cache, reuse and forecast side by side).

Usage:
    python benchmarks/quality.py                     # 200 digits, 3 samplers; about 2 h on a loaded 2-core host
    python benchmarks/quality.py --per-class 1 --samplers ddim:6,euler:6 --intervals 3 --branches 0 --out /tmp/q
    python benchmarks/quality.py --model digits-dit --cuts F1B0,F2B1 --grids F2B1:5   # the transformer
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from graph_speed import machine_info, write_results
from torch import nn
from tqdm import tqdm

import dcfx
from dcfx.branches import ideal_speedup_of_counts
from dcfx.demo import save_grid
from dcfx.digits import IMAGE_SIZE, NUM_CLASSES, ClassTokens, generate, load_classifier, load_model
from dcfx.forecast import available_forecasts
from dcfx.quality import accuracy, feature_stats, frechet_distance, psnr
from dcfx.schedule import full_step_indices


@dataclass(frozen=True)
class SamplerKind:
    """How one family of samplers is built from the model's (DDIM) scheduler config."""

    title: str
    build: Callable[[Mapping[str, Any]], Any]
    built_as: str


SAMPLERS: dict[str, SamplerKind] = {
    "ddim": SamplerKind(
        "DDIM",
        lambda config: DDIMScheduler.from_config(config),
        "DDIMScheduler with the model's config (timestep_spacing 'leading', clip_sample)",
    ),
    "dpm": SamplerKind(
        "DPM-Solver++ (2M)",
        lambda config: DPMSolverMultistepScheduler.from_config(config, timestep_spacing="leading"),
        "DPMSolverMultistepScheduler.from_config(model config, timestep_spacing='leading'): DPM-Solver++, order 2",
    ),
    "euler": SamplerKind(
        "Euler",
        lambda config: EulerDiscreteScheduler.from_config(config, timestep_spacing="leading"),
        "EulerDiscreteScheduler.from_config(model config, timestep_spacing='leading')",
    ),
}

# A method: (schedule, forecast) through dcfx, or no cache at fewer steps.
METHODS = {
    ("uniform", "none"): "dcfx uniform",
    ("uniform", "linear"): "dcfx uniform + forecast",
    ("non-uniform", "none"): "dcfx non-uniform",
    ("non-uniform", "linear"): "dcfx non-uniform + forecast",
}
FEWER = "fewer steps"
SHORT = {
    "dcfx uniform": "reuse",
    "dcfx uniform + forecast": "forecast",
    "dcfx non-uniform": "non-uniform",
    "dcfx non-uniform + forecast": "non-uniform + forecast",
    FEWER: FEWER,
}


def parse_sampler(text: str) -> tuple[str, int]:
    """Returns (kind, steps) of 'ddim:50'; raises ValueError naming the valid kinds."""
    kind, _, steps = text.strip().partition(":")
    if kind not in SAMPLERS or not steps.isdigit() or int(steps) < 2:
        raise ValueError(f"sampler must be KIND:STEPS with KIND in {', '.join(SAMPLERS)} and STEPS >= 2, got {text!r}")
    return kind, int(steps)


def sampler_title(text: str) -> str:
    kind, steps = parse_sampler(text)
    return f"{SAMPLERS[kind].title} {steps}"


@dataclass(frozen=True)
class Scenario:
    """What is generated and compared."""

    model: str = "digits"  # or "digits-dit"
    samplers: tuple[str, ...] = ("ddim:50", "dpm:20", "euler:30")
    guidance: float = 1.0
    per_class: int = 20
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    branches: tuple[int, ...] = (0, 1, 2, 3)  # the U-Net's cuts
    cuts: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (2, 1), (2, 2))  # the transformer's (first, last)
    schedules: tuple[str, ...] = ("uniform", "non-uniform")
    forecasts: tuple[str, ...] = ("none", "linear")
    forecast_schedules: tuple[str, ...] = ("uniform",)  # the schedules also run with forecast="linear"
    fewer_steps: bool = True
    center_share: float = 0.3  # non-uniform centre: this share of the steps (the paper's 15 of 50)
    power: float = 1.4
    seed: int = 0
    threads: int = 1
    grids: tuple[tuple[Any, int], ...] = ((0, 5), (0, 10), (3, 10))  # (branch or (first, last), N) shown as images

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.per_class < 1:
            raise ValueError(f"need per_class >= 1, got {self.per_class}")
        if not self.samplers:
            raise ValueError("need at least one sampler")
        for text in self.samplers:
            parse_sampler(text)
        if not self.intervals or min(self.intervals) < 2:
            raise ValueError(f"intervals must be >= 2, got {self.intervals}")
        bad = [s for s in (*self.schedules, *self.forecast_schedules) if s not in ("uniform", "non-uniform")]
        if bad or not self.schedules:
            raise ValueError(f"schedules must be uniform and/or non-uniform, got {self.schedules}")
        bad = [f for f in self.forecasts if f not in available_forecasts()]
        if bad or not self.forecasts:
            raise ValueError(f"forecasts must be some of {', '.join(available_forecasts())}, got {self.forecasts}")

    def methods(self) -> list[tuple[str, str]]:
        """Returns the (schedule, forecast) pairs run through dcfx, in table order."""
        return [
            (schedule, forecast)
            for schedule in self.schedules
            for forecast in self.forecasts
            if forecast == "none" or schedule in self.forecast_schedules
        ]

    def center(self, steps: int) -> int:
        return min(steps - 1, round(self.center_share * steps))

    @property
    def cut_keys(self) -> tuple[Any, ...]:
        """Returns the model's cuts: branch ids of the U-Net, (first, last) pairs of the transformer."""
        return self.branches if self.model == "digits" else self.cuts


MODELS = {"digits": "the bundled digits U-Net", "digits-dit": "the bundled digits transformer (DiT)"}
GRIDS = {"digits": Scenario.grids, "digits-dit": (((2, 1), 5), ((2, 1), 10), ((1, 0), 5))}


def cut_fields(key: Any) -> dict[str, int]:
    """Returns the DeepCacheConfig fields of a cut: a branch id, or a transformer's (first, last)."""
    return {"branch": key} if isinstance(key, int) else {"first": key[0], "last": key[1]}


def cut_label(key: Any) -> str:
    """Returns how tables name a cut: b0 (a branch), F2B1 (first 2, last 1: cache-dit's notation)."""
    return f"b{key}" if isinstance(key, int) else f"F{key[0]}B{key[1]}"


def parse_cut(text: str) -> Any:
    """Returns the cut key of 'F2B1' (a transformer's first and last) or '3' (a branch)."""
    found = re.fullmatch(r"F(\d+)B(\d+)", text.strip())
    if found:
        return int(found[1]), int(found[2])
    if text.strip().isdigit():
        return int(text)
    raise ValueError(f"a cut is a branch id (0, 1, ...) or FnBm (first n, last m blocks), got {text!r}")


@dataclass(frozen=True)
class Subject:
    """The model under test: the denoiser, its sampling loop and the FLOP share of each cut."""

    denoiser: nn.Module
    scheduler_config: Mapping[str, Any]
    draw: Callable[..., torch.Tensor]  # draw(denoiser, scheduler, labels, steps=, guidance=, seed=)
    shares: dict[Any, float]  # cut key -> r


def load_subject(scenario: Scenario) -> Subject:
    """Returns the scenario's model with the FLOP shares of its cuts; raises ValueError for a cut it lacks."""
    batch = scenario.per_class * NUM_CLASSES * (2 if scenario.guidance > 1 else 1)
    shape = (batch, 1, IMAGE_SIZE, IMAGE_SIZE)
    if scenario.model == "digits":
        model = load_model()
        infos = dcfx.branches(model.unet, shape)
        bad = [b for b in scenario.branches if b >= len(infos)]
        if bad:
            raise ValueError(f"branch(es) {bad} out of range for the digits model; valid: 0..{len(infos) - 1}")

        def draw_unet(unet: nn.Module, scheduler: Any, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return sample(unet, model.tokens, scheduler, labels, **kwargs)

        shares = {b: infos[b].flop_share for b in scenario.branches}
        return Subject(model.unet, model.scheduler().config, draw_unet, shares)
    from dcfx import digits_dit

    dit = digits_dit.load_model()
    infos = {(i.first, i.last): i.flop_share for i in dcfx.branches(dit.transformer, shape)}
    bad = [cut_label(c) for c in scenario.cuts if c not in infos]
    if bad:
        n = len(dit.transformer.transformer_blocks)
        raise ValueError(f"cut(s) {bad} out of range for digits-dit ({n} blocks): first + last <= {n - 1}")
    shares = {c: infos[c] for c in scenario.cuts}
    return Subject(dit.transformer, dit.scheduler().config, digits_dit.generate, shares)


def log(message: str) -> None:
    tqdm.write(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def sample(
    unet: nn.Module,
    tokens: ClassTokens,
    scheduler: Any,
    labels: torch.Tensor,
    *,
    steps: int,
    guidance: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Returns images (B, 1, 16, 16) in [-1, 1] of the digits ``labels`` with any diffusers scheduler.

    ``dcfx.digits.generate``, which applies the scheduler's input scaling (Euler's sigmas).
    """
    return generate(unet, tokens, scheduler, labels, steps=steps, guidance=guidance, seed=seed)


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
            scores |= psnr_scores(images, self.reference)
        return scores


def psnr_scores(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    values = psnr(images, reference)
    finite = values[torch.isfinite(values)]
    return {
        "psnr": finite.mean().item() if len(finite) else float("inf"),
        "identical_images": int((~torch.isfinite(values)).sum()),
    }


def run(scenario: Scenario, out: Path) -> list[dict[str, Any]]:
    """Returns one row per sampler and configuration; writes the grids into ``out``."""
    subject = load_subject(scenario)
    config = subject.scheduler_config
    labels = torch.arange(NUM_CLASSES).repeat(scenario.per_class)
    scorer = Scorer(labels)
    methods = scenario.methods()
    per_sampler = 1 + len(scenario.cut_keys) * len(scenario.intervals) * (len(methods) + scenario.fewer_steps)
    bar = tqdm(total=len(scenario.samplers) * per_sampler, desc="configurations", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    first_reference: torch.Tensor | None = None
    for text in scenario.samplers:
        kind, steps = parse_sampler(text)
        scheduler = SAMPLERS[kind].build(config)
        common = {"sampler": text, "sampler_title": sampler_title(text)}

        def timed(denoiser: nn.Module, n_steps: int, scheduler: Any = scheduler) -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            images = subject.draw(
                denoiser, scheduler, labels, steps=n_steps, guidance=scenario.guidance, seed=scenario.seed
            )
            return images, time.perf_counter() - start

        scorer.reference = None
        base, base_s = timed(subject.denoiser, steps)
        row = {**common, "method": "no cache", "steps": steps, "loop_s": base_s, **scorer(base)}
        if first_reference is not None:  # how far this sampler lands from the first one's images
            row["psnr_vs_first_sampler"] = psnr_scores(base, first_reference)["psnr"]
        first_reference = base if first_reference is None else first_reference
        rows.append(row)
        scorer.reference = base
        bar.update()
        fewer_steps: dict[int, dict[str, Any]] = {}
        for key in scenario.cut_keys:
            r, cut, label = subject.shares[key], cut_fields(key), cut_label(key)
            shown: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
            for forecast in scenario.forecasts:
                fast = dcfx.compile(subject.denoiser, **cut, interval=2, scheduler=scheduler, forecast=forecast)
                timed(fast, 2)  # builds the graphs for this batch, outside the timed runs
                for schedule in scenario.schedules:
                    if (schedule, forecast) not in methods:
                        continue
                    for n in scenario.intervals:
                        extra = {"center": scenario.center(steps), "power": scenario.power}
                        cfg = dcfx.DeepCacheConfig(
                            **cut,
                            interval=n,
                            schedule=schedule,
                            forecast=forecast,
                            **(extra if schedule == "non-uniform" else {}),
                        )
                        full = len(full_step_indices(cfg, steps))
                        images, seconds = timed(fast.reschedule(cfg), steps)
                        row = {
                            **common,
                            "method": METHODS[schedule, forecast],
                            "forecast": forecast,
                            **cut,
                            "cut": label,
                            "interval": n,
                            "r": r,
                            "steps": steps,
                            "full_steps": full,
                            "ideal": ideal_speedup_of_counts(full, steps - full, r),
                            "loop_s": seconds,
                            "speedup_measured": base_s / seconds,
                            **extra_of(cfg),
                            **scorer(images),
                        }
                        rows.append(row)
                        if schedule == "uniform" and (key, n) in scenario.grids:
                            shown[n, forecast] = (f"{SHORT[row['method']]} ({row['psnr']:.1f} dB)", images)
                        bar.update()
                del fast
            for n in sorted({n for n, _ in shown}):
                panels = [("no cache", base)] + [shown[n, f] for f in scenario.forecasts if (n, f) in shown]
                title = f"{kind}{steps}_{label}_n{n}"
                save_grid(panels, NUM_CLASSES, out / f"grid_{title}.png")
            if scenario.fewer_steps:
                for n in scenario.intervals:
                    full = len(full_step_indices(dcfx.DeepCacheConfig(**cut, interval=n), steps))
                    fewer = max(1, round(full + (steps - full) * r))
                    if fewer not in fewer_steps:
                        images, seconds = timed(subject.denoiser, fewer)
                        fewer_steps[fewer] = {"loop_s": seconds, **scorer(images)}
                    rows.append(
                        {
                            **common,
                            "method": FEWER,
                            **cut,
                            "cut": label,
                            "interval": n,
                            "r": r,
                            "steps": fewer,
                            "ideal": steps / fewer,
                            "speedup_measured": base_s / fewer_steps[fewer]["loop_s"],
                            **fewer_steps[fewer],
                        }
                    )
                    bar.update()
            log(f"{text}: {label} (r = {r:.3f}) done")
    bar.close()
    return rows


def extra_of(config: dcfx.DeepCacheConfig) -> dict[str, Any]:
    if config.schedule != "non-uniform":
        return {}
    return {"center": config.center, "power": config.power}


def pareto(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """Returns the (cost-saving, quality) points no other point beats on both, by rising speedup."""
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if not front or sign * y > sign * front[-1][1]:
            front.append((x, y))
    return front[::-1]


def best_at(rows: list[dict[str, Any]], speedup: float, metric: str) -> dict[str, Any] | None:
    """Returns the row of the best ``metric`` among rows at least ``speedup`` fast (FLOP-ideal)."""
    fast = [r for r in rows if r["ideal"] >= speedup - 1e-9]
    if not fast:
        return None
    return max(fast, key=lambda r: r[metric]) if metric != "fd" else min(fast, key=lambda r: r[metric])


def frontier_table(rows: list[dict[str, Any]], methods: list[str], targets: tuple[float, ...]) -> list[str]:
    """Returns markdown lines: per speedup target, each method's best PSNR (and its config) and best FD."""
    lines = [
        "| FLOP-ideal speedup >= | " + " | ".join(SHORT[m] for m in methods) + " |",
        "|---:|" + "---|" * len(methods),
    ]
    for target in targets:
        cells = []
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            best, best_fd = best_at(mine, target, "psnr"), best_at(mine, target, "fd")
            if best is None or best_fd is None:
                cells.append("-")
                continue
            where = f"{best['cut']} 1:{best['interval']}" if method != FEWER else f"{best['steps']} steps"
            cells.append(f"{best['psnr']:.1f} dB ({where}), FD {best_fd['fd']:.1f}")
        lines.append(f"| {target:g}x | " + " | ".join(cells) + " |")
    return lines


def markdown(scenario: Scenario, rows: list[dict[str, Any]], settings: Mapping[str, Any] | None = None) -> str:
    """Returns per sampler: the no-cache scores, reuse vs forecast, the frontier and the full table."""
    digits = scenario.per_class * NUM_CLASSES
    call = "unet, branch=b" if scenario.model == "digits" else "transformer, first=F, last=B"
    lines = [
        f"# DeepCache quality on {MODELS[scenario.model]}: {digits} digits, "
        f"{', '.join(sampler_title(s) for s in scenario.samplers)}, guidance {scenario.guidance}",
        "",
        f"Generated through dcfx's runtime (`dcfx.compile({call}, interval=N, forecast=..., "
        "scheduler=...)`), eager backend, fp32, the same seeds for every row.",
    ]
    if scenario.model == "digits-dit":
        lines.append(
            "Cuts are named as cache-dit names them: FnBm runs the first n and the last m blocks on every "
            "step and adds, on cached steps, the residual the middle blocks added at the last full step."
        )
    if settings:
        lines += ["", "Run: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + "."]
    methods = [METHODS[m] for m in scenario.methods()] + ([FEWER] if scenario.fewer_steps else [])
    for text in scenario.samplers:
        mine = [r for r in rows if r["sampler"] == text]
        base, cached = mine[0], mine[1:]
        kind = parse_sampler(text)[0]
        vs_first = (
            f", {base['psnr_vs_first_sampler']:.1f} dB from {sampler_title(scenario.samplers[0])}'s images"
            if "psnr_vs_first_sampler" in base
            else ""
        )
        lines += [
            "",
            f"## {sampler_title(text)}",
            "",
            f"Scheduler: {SAMPLERS[kind].built_as}. No cache: accuracy {base['accuracy']:.1%}, "
            f"Frechet distance {base['fd']:.2f}{vs_first}, loop {base['loop_s']:.1f} s.",
        ]
        uniform = {(r["cut"], r["interval"], r["method"]): r for r in cached}
        if ("uniform", "linear") in scenario.methods() and ("uniform", "none") in scenario.methods():
            lines += [
                "",
                "PSNR dB reuse -> forecast (uniform 1:N), FD reuse -> forecast:",
                "",
                "| cut (r) | " + " | ".join(f"N={n}" for n in scenario.intervals) + " |",
                "|---|" + "---|" * len(scenario.intervals),
            ]
            for label in map(cut_label, scenario.cut_keys):
                cells = []
                for n in scenario.intervals:
                    a, b = (
                        uniform[label, n, METHODS["uniform", "none"]],
                        uniform[label, n, METHODS["uniform", "linear"]],
                    )
                    cells.append(
                        f"{a['psnr']:.1f} -> {b['psnr']:.1f} ({b['psnr'] - a['psnr']:+.1f}); "
                        f"FD {a['fd']:.1f} -> {b['fd']:.1f}"
                    )
                r = next(r["r"] for r in cached if r["cut"] == label)
                lines.append(f"| {label} ({r:.3f}) | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Frontier: the best PSNR (and the lowest FD) each method reaches at or above each FLOP-ideal speedup:",
            "",
            *frontier_table(
                cached, [m for m in methods if any(r["method"] == m for r in cached)], (1.5, 2, 2.5, 3, 4, 5, 6)
            ),
            "",
            "| cut | N | method | steps (full) | FLOP-ideal speedup | PSNR dB vs no cache | accuracy | FD "
            "| loop s (one run) |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        order = {m: i for i, m in enumerate(methods)}
        cut_order = {cut_label(key): i for i, key in enumerate(scenario.cut_keys)}
        for row in sorted(cached, key=lambda r: (cut_order[r["cut"]], r["interval"], order[r["method"]])):
            full = f" ({row['full_steps']})" if "full_steps" in row else ""
            lines.append(
                f"| {row['cut']} | {row['interval']} | {row['method']} | {row['steps']}{full} | {row['ideal']:.2f}x "
                f"| {row['psnr']:.1f} | {row['accuracy']:.1%} | {row['fd']:.2f} | {row['loop_s']:.1f} |"
            )
    lines += [
        "",
        "- PSNR: mean over images of each image against the no-cache image of the same seed, digit and sampler "
        "(pixel range [-1, 1], so data range 2); identical images are left out of the mean.",
        "- accuracy: the bundled classifier's reading equals the requested digit (the CLIP score's analog).",
        "- FD: Frechet distance of the classifier's 64-d features against those of all 1797 real digits "
        f"(FID's analog); {digits} generated digits, so it carries a small-sample bias shared by every row.",
        '- forecast: `forecast="linear"`: shallow steps read f1 + c (f1 - f0) from the features of the last two '
        "full steps, c = (t - t1) / (t1 - t0) on the timestep, at most 1; plain reuse until there are two.",
        "- fewer steps: the paper's baseline, no cache with as many steps of the same sampler as the FLOPs of "
        "uniform 1:N buy: round(full + shallow r). The forecast costs one elementwise op per shallow step, "
        "not counted.",
        f"- non-uniform: the paper's schedule around {scenario.center_share:.0%} of the steps (15 of 50) "
        f"with power {scenario.power}.",
    ]
    return "\n".join(lines)


STYLES = {
    "dcfx uniform": ("o", "-", "C0"),
    "dcfx uniform + forecast": ("^", "-", "C3"),
    "dcfx non-uniform": ("s", ":", "C2"),
    "dcfx non-uniform + forecast": ("v", ":", "C1"),
    FEWER: ("x", "--", "C7"),
}


def plot(scenario: Scenario, rows: list[dict[str, Any]], path: Path) -> None:
    """Writes PSNR, accuracy and FD against the FLOP-ideal speedup: every configuration, each method's frontier."""
    from matplotlib.figure import Figure

    metrics = (
        ("psnr", "PSNR dB vs no cache", True),
        ("accuracy", "classifier accuracy", True),
        ("fd", "Frechet distance", False),
    )
    columns = len(scenario.samplers)
    fig = Figure(figsize=(4.5 * columns, 10), layout="constrained")
    axes = fig.subplots(len(metrics), columns, squeeze=False)
    for col, text in enumerate(scenario.samplers):
        mine = [r for r in rows if r["sampler"] == text]
        for ax, (metric, label, higher) in zip(axes[:, col], metrics, strict=True):
            for method, (marker, line, color) in STYLES.items():
                pts = [(r["ideal"], r[metric]) for r in mine[1:] if r["method"] == method]
                if not pts:
                    continue
                ax.plot(*zip(*pts, strict=True), marker, color=color, alpha=0.35, ms=4)
                ax.plot(
                    *zip(*pareto(pts, higher), strict=True), line, color=color, marker=marker, ms=4, label=SHORT[method]
                )
            if metric != "psnr":
                ax.axhline(mine[0][metric], color="grey", lw=1, label="no cache")
            ax.set(xlabel="FLOP-ideal speedup", ylabel=label)
            ax.grid(alpha=0.3)
        axes[0, col].set_title(f"{sampler_title(text)}: frontier of each method")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(
        f"{MODELS[scenario.model]}, {scenario.per_class * NUM_CLASSES} digits, cuts "
        f"{','.join(map(cut_label, scenario.cut_keys))}, N {','.join(map(str, scenario.intervals))} "
        "(faint: every configuration; line: the method's frontier)"
    )
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, choices=list(MODELS), help="the U-Net or the transformer")
    p.add_argument("--samplers", default=",".join(d.samplers), help=f"KIND:STEPS, KIND in {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, help="shorthand for --samplers ddim:STEPS (the benchmark before forecasting)")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--per-class", type=int, default=d.per_class)
    p.add_argument("--intervals", default=",".join(map(str, d.intervals)))
    p.add_argument("--branches", default=",".join(map(str, d.branches)), help="digits: the branches")
    p.add_argument("--cuts", default=",".join(map(cut_label, d.cuts)), help="digits-dit: FnBm, first n and last m")
    p.add_argument("--schedules", default=",".join(d.schedules))
    p.add_argument("--forecasts", default=",".join(d.forecasts), help="none (reuse) and/or linear")
    p.add_argument(
        "--forecast-schedules", default=",".join(d.forecast_schedules), help="the schedules also run with forecast"
    )
    p.add_argument("--no-fewer-steps", action="store_true", help="leave out the fewer-steps baseline")
    p.add_argument("--grids", help="CUT:N shown as image grids, CUT a branch or FnBm (default: three per model)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (1 is fastest on a shared host)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    args = p.parse_args(argv)

    def items(text: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in text.split(",") if s.strip())

    scenario = Scenario(
        samplers=(f"ddim:{args.steps}",) if args.steps else items(args.samplers),
        guidance=args.guidance,
        per_class=args.per_class,
        intervals=tuple(int(x) for x in items(args.intervals)),
        model=args.model,
        branches=tuple(int(x) for x in items(args.branches)),
        cuts=tuple(parse_cut(x) for x in items(args.cuts)),
        schedules=items(args.schedules),
        forecasts=items(args.forecasts),
        forecast_schedules=items(args.forecast_schedules),
        fewer_steps=not args.no_fewer_steps,
        seed=args.seed,
        grids=tuple((parse_cut(c), int(n)) for c, _, n in (g.rpartition(":") for g in items(args.grids)))
        if args.grids
        else GRIDS[args.model],
        threads=args.threads,
    )
    torch.set_num_threads(scenario.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    rows = run(scenario, args.out)
    wall = time.perf_counter() - start
    machine = machine_info() | {"loadavg_start": load_start}
    result = {"benchmark": "quality", "started": started, "wall_s": wall, "scenario": asdict(scenario)}
    result |= {"samplers": {s: SAMPLERS[parse_sampler(s)[0]].built_as for s in scenario.samplers}}
    result |= {"machine": machine, "rows": rows}
    settings = {
        "started": started,
        "wall": f"{wall / 60:.0f} min",
        "torch threads": scenario.threads,
        "load average at start / end": f"{load_start[0]:.1f} / {machine['loadavg'][0]:.1f}" if load_start else "n/a",
        "dcfx": machine["dcfx_commit"],
    }
    name = "quality" if scenario.model == "digits" else "quality_dit"
    write_results(
        args.out, name, result, markdown(scenario, rows, settings), lambda path: plot(scenario, rows, path), log
    )


if __name__ == "__main__":
    main()
