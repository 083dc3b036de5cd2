"""Load test of a whole pipeline served by prompt: dcfx's PipelineService against plain diffusers.

A Stable Diffusion 1.x-layout pipeline (tests/serve/pipelines.py: a real CLIP tokenizer and
text encoder, a VAE) around a U-Net large enough to dominate a request's cost, 20 DDIM steps,
classifier-free guidance 7.5 (two U-Net rows per request). Requests arrive as a Poisson process
(open loop) with a prompt and a seed each, and are served in this process four ways:

- ``diffusers-one-at-a-time``: a worker thread runs the plain pipeline per request, FIFO;
- ``diffusers-request-batching``: the worker takes every waiting request (at most 8) and runs
  them as one pipeline call (a prompt list, one ``torch.Generator`` per request);
- ``dcfx-one-at-a-time``: the pipeline with ``dcfx.enable`` (DeepCache alone), one at a time;
- ``dcfx``: ``PipelineService``: the text-encoder stage, the step-batching engine with the same
  DeepCache config, the VAE stage, each in a thread of its own.

The two diffusers workers are ``dcfx.serve.stages.BatchStage``s (a queue and a thread that
takes what waits, at most ``max_items``): the same queueing as the dcfx stages. Latency runs
from a request's arrival to its PNG; throughput is the departure rate (requests finished per
second between the first and the last counted departure); a run keeps up when its requests
leave at >= 0.9x the rate they arrived at (``serve_load.summarize``). The offered rates are
multiples of s, the plain pipeline's time for one request, measured first with each stage's
share of it. The process is pinned to one core and torch runs one thread, so every number is
one core's. Every image served by ``dcfx`` is compared with the same request's image from
``dcfx-one-at-a-time`` (the offline pipeline with ``dcfx.enable``, the same config).

Writes serve_pipeline_load.json (everything, machine and load average included),
serve_pipeline_load.md and serve_pipeline_load.png (latency against throughput).

    python benchmarks/serve_pipeline_load.py --out docs/benchmarks/serve
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_load import arrivals, summarize, throughput_at  # noqa: E402

import dcfx  # noqa: E402
from dcfx.serve import Engine, EngineConfig, GenerationRequest  # noqa: E402
from dcfx.serve.images import ImageRequest  # noqa: E402
from dcfx.serve.pipeline import PipelineServeModel, load_pipeline  # noqa: E402
from dcfx.serve.service import PipelineService  # noqa: E402
from dcfx.serve.stages import BatchStage  # noqa: E402
from tests.serve.pipelines import save_tiny_sd_pipeline  # noqa: E402

VARIANTS = ("diffusers-one-at-a-time", "diffusers-request-batching", "dcfx-one-at-a-time", "dcfx")
BASELINE = "diffusers-one-at-a-time"
PROMPTS = (
    "a red fox in the snow",
    "a blue car on a bridge",
    "a green tree, oil painting",
    "two cats on a sofa",
    "a lighthouse at night",
    "a bowl of ramen",
    "an old map of the sea",
    "a robot reading a book",
    "mountains at sunrise",
    "a yellow submarine",
)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """What one benchmark run measures."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    sample_size: int = 16  # latent side; the image is twice that (the tiny VAE's two blocks)
    steps: int = 20
    guidance: float = 7.5
    branch: int = 0
    interval: int = 3
    max_batch: int = 16  # the engine's U-Net rows per call (a guided request takes two)
    max_requests_per_call: int = 8  # diffusers request batching: 16 U-Net rows, as the engine's
    loads: tuple[float, ...] = (0.5, 0.9, 2.0)  # offered rates, in requests per s (s: one plain request)
    requests: int = 64  # per run
    warmup_requests: int = 8  # the first of each run, not counted (the system starts empty)
    repeats: int = 1  # runs per (rate, variant), variants in a shuffled order each time
    share_requests: int = 5  # plain requests timed stage by stage (medians)
    threads: int = 1
    seed: int = 0

    @property
    def deepcache(self) -> dcfx.DeepCacheConfig:
        return dcfx.DeepCacheConfig(branch=self.branch, interval=self.interval)


def prompt_of(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)]


def png_bytes(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def build_unet(scenario: Scenario) -> torch.nn.Module:
    """Returns the SD 1.x-layout U-Net of the scenario (cross-attention width 8: the tiny text encoder's)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(scenario.seed)
    return UNet2DConditionModel(
        block_out_channels=scenario.block_out_channels,
        sample_size=scenario.sample_size,
        cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def load_diffusers(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe: Any, indices: Sequence[int], scenario: Scenario) -> list[bytes]:
    """Returns the PNGs of requests ``indices``, run as one call of ``pipe`` (each image keeps its seed)."""
    generators = [torch.Generator().manual_seed(i) for i in indices]
    images = pipe(
        prompt=[prompt_of(i) for i in indices],
        generator=generators if len(indices) > 1 else generators[0],
        num_inference_steps=scenario.steps,
        guidance_scale=scenario.guidance,
    ).images
    return [png_bytes(image) for image in images]


def stage_shares(pipe: Any, scenario: Scenario) -> dict[str, Any]:
    """Returns the medians of one plain request's stages (seconds) and their shares of its time.

    The stages split the call at the text encoder's last forward, the VAE decoder's start and
    end: text encoder (tokenizer included), the U-Net loop (latents, timesteps, U-Net and
    scheduler steps), the VAE decoder, and post-processing with the PNG encoding.
    """
    marks: dict[str, float] = {}
    unet_s: list[float] = []

    def encoded(*_: Any) -> None:
        marks["encoded"] = time.perf_counter()

    def unet_start(*_: Any) -> None:
        marks["unet"] = time.perf_counter()

    def unet_end(*_: Any) -> None:
        unet_s.append(time.perf_counter() - marks["unet"])

    vae_decode = pipe.vae.decode

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        marks["vae_start"] = time.perf_counter()
        out = vae_decode(*args, **kwargs)
        marks["vae_end"] = time.perf_counter()
        return out

    hooks = [
        pipe.text_encoder.register_forward_hook(encoded),
        pipe.unet.register_forward_pre_hook(unet_start),
        pipe.unet.register_forward_hook(unet_end),
    ]
    pipe.vae.decode = timed_decode
    samples = []
    try:
        for i in range(scenario.share_requests + 1):
            unet_s.clear()
            start = time.perf_counter()
            run_pipeline(pipe, [i], scenario)
            end = time.perf_counter()
            samples.append(
                {
                    "total_s": end - start,
                    "text_encoder_s": marks["encoded"] - start,
                    "unet_loop_s": marks["vae_start"] - marks["encoded"],
                    "vae_decoder_s": marks["vae_end"] - marks["vae_start"],
                    "postprocess_png_s": end - marks["vae_end"],
                    "unet_forwards_s": sum(unet_s),
                }
            )
    finally:
        for hook in hooks:
            hook.remove()
        del pipe.vae.decode
    counted = samples[1:]  # the first call warms up
    medians = {key: statistics.median(s[key] for s in counted) for key in counted[0]}
    shares = {key[:-2]: medians[key] / medians["total_s"] for key in medians if key != "total_s"}
    return {"medians_s": medians, "shares": shares, "requests": len(counted)}


def service_time(pipe: Any, scenario: Scenario, count: int) -> float:
    """Returns the median seconds of one request through ``pipe`` alone, PNG included (after a warm-up call)."""
    run_pipeline(pipe, [0], scenario)
    times = []
    for i in range(count):
        start = time.perf_counter()
        run_pipeline(pipe, [i], scenario)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Pipelines:
    """The served objects, loaded once from one folder: plain, dcfx-enabled, and the engine's model and runtime."""

    def __init__(self, folder: Path, scenario: Scenario, log: Callable[[str], None]) -> None:
        self.scenario = scenario
        self.plain = load_diffusers(folder)
        self.cached = dcfx.enable(load_diffusers(folder), scenario.deepcache)
        self.model: PipelineServeModel = load_pipeline(folder)
        self.runtime = dcfx.compile(self.model.unet, scenario.deepcache)
        log("building the engine's graph pairs of every batch size (not timed) ...")
        started = time.perf_counter()
        cond, negative = self.model.encode([prompt_of(0), ""])
        request = GenerationRequest(
            conditioning=cond,
            negative_conditioning=negative,
            steps=scenario.steps,
            guidance=scenario.guidance,
            scheduler="pipeline",
        )
        Engine(self.runtime, self.model, self.engine_config()).warmup(request)
        self.warmup_s = time.perf_counter() - started

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_batch=self.scenario.max_batch, max_queue=100_000)

    def request(self, i: int) -> ImageRequest:
        return ImageRequest(prompt=prompt_of(i), seed=i, steps=self.scenario.steps, guidance=self.scenario.guidance)


def arrivals_at(rate: float, count: int, warmup: int, seed: int) -> list[float]:
    """Returns ``count`` Poisson arrival times at ``rate``, scaled so the counted ones arrive at ``rate``.

    A draw of a few dozen arrivals is often 20% sparser or denser than its rate (seed 0 of 64:
    18% sparser), which would shift every variant's load alike; scaling the draw keeps its
    shape (the bursts and gaps) and makes the measured arrival rate the offered one.
    """
    times = arrivals(rate, count, seed)
    scale = (count - warmup - 1) / rate / (times[-1] - times[warmup])
    return [t * scale for t in times]


def drive(submit: Callable[[int], Future[list[bytes]]], times: Sequence[float]) -> tuple[list[Any], list[list[bytes]]]:
    """Submits request i at ``times[i]`` (seconds from now); returns each one's (arrival, finish) and its PNGs."""
    finished: dict[int, float] = {}

    def done(i: int) -> Callable[[Future[Any]], None]:
        return lambda _: finished.__setitem__(i, time.perf_counter())

    start = time.perf_counter()
    futures = []
    for i, t in enumerate(times):
        time.sleep(max(0.0, start + t - time.perf_counter()))
        future = submit(i)
        future.add_done_callback(done(i))
        futures.append(future)
    pngs = [f.result() for f in futures]
    spans = [(start + t, finished[i]) for i, t in enumerate(times)]
    return spans, pngs


def run_variant(name: str, pipes: Pipelines, times: Sequence[float]) -> dict[str, Any]:
    """Returns one run of a variant on the arrivals ``times``: spans, PNGs, calls, load and CPU use."""
    scenario = pipes.scenario
    load_before, cpu, wall = os.getloadavg()[0], time.process_time(), time.perf_counter()
    if name == "dcfx":
        service = PipelineService(pipes.model, Engine(pipes.runtime, pipes.model, pipes.engine_config()))
        try:

            def submit(i: int) -> Future[list[bytes]]:
                out: Future[list[bytes]] = Future()

                def served(f: Future[Any]) -> None:
                    error = f.exception()
                    out.set_exception(error) if error else out.set_result(f.result().pngs)

                service.submit(pipes.request(i)).add_done_callback(served)
                return out

            spans, pngs = drive(submit, times)
            stats = service.stats()
        finally:
            service.close()
    else:
        pipe = pipes.cached if name == "dcfx-one-at-a-time" else pipes.plain
        items = scenario.max_requests_per_call if name == "diffusers-request-batching" else 1
        stage = BatchStage(name, lambda indices: [[png] for png in run_pipeline(pipe, indices, scenario)], items)
        try:
            spans, pngs = drive(stage.submit, times)
            stats = {f"pipeline_{k}": v for k, v in stage.stats().items()}
        finally:
            stage.close()
    return {
        "spans": spans,
        "pngs": pngs,
        "stats": stats,
        "load": [load_before, os.getloadavg()[0]],
        "cpu_busy": (time.process_time() - cpu) / (time.perf_counter() - wall),
    }


def mean_per_call(hist: dict[int, int]) -> float:
    calls = sum(hist.values())
    return sum(size * n for size, n in hist.items()) / calls if calls else 0.0


def call_summary(stats: dict[str, Any]) -> dict[str, float]:
    """Returns calls per stage and mean items (requests, or live U-Net rows) per call of a run."""
    if "full_calls" not in stats:
        return {
            "pipeline_calls": stats["pipeline_calls"],
            "requests_per_call": mean_per_call(stats["pipeline_items_per_call"]),
        }
    return {
        "text_encoder_calls": stats["text_encoder_calls"],
        "requests_per_text_encoder_call": mean_per_call(stats["text_encoder_items_per_call"]),
        "full_calls": stats["full_calls"],
        "rows_per_full_call": mean_per_call(stats["full_rows"]),
        "shallow_calls": stats["shallow_calls"],
        "rows_per_shallow_call": mean_per_call(stats["shallow_rows"]),
        "padded_rows": stats["padded_rows"],
        "vae_decoder_calls": stats["vae_decoder_calls"],
        "requests_per_vae_call": mean_per_call(stats["vae_decoder_items_per_call"]),
    }


def variant_row(name: str, rate: float, runs: Sequence[dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    row = {"variant": name, **summarize([r["spans"] for r in runs], rate, scenario.warmup_requests)}
    calls = [call_summary(r["stats"]) for r in runs]
    row.update({key: statistics.fmean(c[key] for c in calls) for key in calls[0]})
    row["load_avg_1m"] = [min(r["load"][0] for r in runs), max(r["load"][1] for r in runs)]
    row["cpu_busy"] = min(r["cpu_busy"] for r in runs)
    return row


def describe(row: dict[str, Any]) -> str:
    text = (
        f"rate {row['offered_rate']:5.2f}/s {row['variant']:26s} throughput {row['throughput']:5.2f}/s  "
        f"p50 {row['p50_s']:6.2f} s  p99 {row['p99_s']:6.2f} s  {'keeps up' if row['keeps_up'] else 'falls behind'}"
    )
    return f"{text}  ({calls_text(row)}; CPU busy {row['cpu_busy']:.2f})"


def calls_text(row: dict[str, Any]) -> str:
    if "full_calls" in row:
        return (
            f"text encoder {row['text_encoder_calls']:.0f} x {row['requests_per_text_encoder_call']:.1f}, "
            f"U-Net full {row['full_calls']:.0f} x {row['rows_per_full_call']:.1f} rows, "
            f"shallow {row['shallow_calls']:.0f} x {row['rows_per_shallow_call']:.1f} rows, "
            f"VAE {row['vae_decoder_calls']:.0f} x {row['requests_per_vae_call']:.1f}"
        )
    return f"pipeline {row['pipeline_calls']:.0f} x {row['requests_per_call']:.1f}"


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def compare(served: Sequence[bytes], reference: Sequence[bytes]) -> dict[str, Any]:
    """Returns how many images are byte-equal, within one level per pixel, and the largest pixel difference."""
    diffs = [np.abs(pixels(a) - pixels(b)) for a, b in zip(served, reference, strict=True)]
    return {
        "images": len(diffs),
        "bytes_equal": sum(a == b for a, b in zip(served, reference, strict=True)),
        "within_one_level": sum(int(d.max()) <= 1 for d in diffs),
        "max_level_diff": max(int(d.max()) for d in diffs),
        "max_share_of_pixels_differing": max(float((d > 0).mean()) for d in diffs),
    }


def check_images(runs: dict[tuple[str, float], list[dict[str, Any]]], rates: Sequence[float]) -> dict[str, Any]:
    """Returns the served images against their references, request by request, at every rate.

    ``dcfx`` against ``dcfx-one-at-a-time`` (the offline pipeline with ``dcfx.enable``, the
    same config); ``diffusers-request-batching`` against ``diffusers-one-at-a-time``.
    """
    out = {}
    for served, reference in (("dcfx", "dcfx-one-at-a-time"), ("diffusers-request-batching", BASELINE)):
        pairs: tuple[list[bytes], list[bytes]] = ([], [])
        for rate in rates:
            for a, b in zip(runs.get((served, rate), []), runs.get((reference, rate), []), strict=False):
                pairs[0].extend(png for pngs in a["pngs"] for png in pngs)
                pairs[1].extend(png for pngs in b["pngs"] for png in pngs)
        if pairs[0]:
            out[f"{served} vs {reference}"] = compare(*pairs)
    return out


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Returns the goal as sentences: each variant's throughput at one-at-a-time's p99, over one-at-a-time's."""
    rates = sorted({r["offered_rate"] for r in rows})
    by = {(r["variant"], r["offered_rate"]): r for r in rows}
    top = rates[-1]
    lines = []
    for base in (by[(BASELINE, q)] for q in rates if (BASELINE, q) in by):
        if not base["keeps_up"]:
            continue
        bound, cells = base["p99_s"], []
        for variant in VARIANTS[1:]:
            grid, smooth = throughput_at([by[(variant, q)] for q in rates if (variant, q) in by], bound)
            cells.append((variant, grid, smooth))
        _, grid, smooth = cells[-1]
        if smooth is None:
            goal = "dcfx kept up at no measured rate within it (goal >= 2x: NOT met)"
        else:
            met = "met" if smooth >= 2 * base["throughput"] else "NOT met"
            goal = (
                f"dcfx {smooth:.2f}/s on its curve ({grid:.2f}/s at a measured rate), "
                f"{smooth / base['throughput']:.2f}x (goal >= 2x: {met})"
            )
        others = ", ".join(
            f"{v} {'-' if x is None else format(x / base['throughput'], '.2f') + 'x'}" for v, _, x in cells[:-1]
        )
        lines.append(
            f"- At p99 <= {bound:.2f} s ({BASELINE}'s at {base['offered_rate']:.2f}/s, where it serves "
            f"{base['throughput']:.2f}/s): {goal}. The others at that p99: {others}. (The highest offered rate, "
            f"{top:.2f}/s, is {top / base['throughput']:.2f}x its throughput: the curves are measured no further.)"
        )
    for q in rates:
        kept = [by[(v, q)] for v in VARIANTS if (v, q) in by and by[(v, q)]["keeps_up"]]
        if kept:
            best = min(kept, key=lambda r: r["p99_s"])
            lines.append(
                f"- {q:.2f}/s: lowest p99 among the variants that keep up: {best['variant']} ({best['p99_s']:.2f} s)."
            )
    return lines


def write_markdown(result: dict[str, Any], path: Path) -> None:
    s, m, soft = result["scenario"], result["machine"], result["versions"]
    shares = result["stage_shares"]
    med, service = shares["medians_s"], result["service_s"]
    lines = [
        "# Serving a whole pipeline by prompt: dcfx against plain diffusers",
        "",
        f"Tiny SD 1.x-layout pipeline (tests/serve/pipelines.py: CLIP tokenizer and 2-layer text encoder of "
        f"width 8, a two-block VAE) around a U-Net of block_out_channels {tuple(s['block_out_channels'])}, "
        f"sample size {s['sample_size']} (images {2 * s['sample_size']}x{2 * s['sample_size']}), "
        f"{result['unet_params_m']:.2f} M parameters; {s['steps']} DDIM steps, guidance {s['guidance']} "
        f"(two U-Net rows per request). DeepCache branch {s['branch']}, 1:{s['interval']} for the dcfx variants; "
        "the engine at "
        f"max_batch {s['max_batch']} rows (calls padded to powers of two), eager; request batching takes at most "
        f"{s['max_requests_per_call']} requests per call. One torch thread, the process pinned to CPU "
        f"{m['pinned_cpu']} (all numbers are one core's). Poisson arrivals, {s['requests']} requests per run, the "
        f"first {s['warmup_requests']} not counted; latency from arrival to the request's PNG; throughput = "
        f"departure rate; keeps up = departures >= 0.9x arrivals. Each rate ran {s['repeats']} time(s) per variant, "
        "the variants in a shuffled order on the same arrivals. CPU busy: the process's CPU time over the run's "
        "wall time (the lowest of the runs; near 1.0 in a run that falls behind means the core was ours).",
        "",
        f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), load average (1 min) {m['load_avg_start'][0]:.1f} "
        f"at the start and {m['load_avg_end'][0]:.1f} at the end (the cores are shared); torch {soft['torch']}, "
        f"diffusers {soft['diffusers']}, transformers {soft['transformers']}. "
        f"Wall time {result['wall_s'] / 60:.1f} min; building the engine's graph pairs (not timed) "
        f"{result['warmup_s']:.0f} s.",
        "",
        "## One plain request, stage by stage",
        "",
        f"Medians of {shares['requests']} requests through the plain pipeline alone:",
        "",
        "| stage | ms | share |",
        "| --- | ---: | ---: |",
    ]
    for key, label in (
        ("text_encoder", "text encoder (tokenizer included)"),
        ("unet_loop", "U-Net loop (U-Net forwards and scheduler steps)"),
        ("vae_decoder", "VAE decoder"),
        ("postprocess_png", "post-processing and PNG"),
    ):
        lines.append(f"| {label} | {med[key + '_s'] * 1e3:.1f} | {shares['shares'][key]:.1%} |")
    lines += [
        f"| total | {med['total_s'] * 1e3:.1f} | 100% |",
        "",
        f"Of the U-Net loop, the U-Net forwards alone: {med['unet_forwards_s'] * 1e3:.1f} ms "
        f"({shares['shares']['unet_forwards']:.1%} of the request). One request alone (median of "
        f"{result['service_requests']}): plain s = {service['plain']:.3f} s, with dcfx.enable "
        f"{service['dcfx_enabled']:.3f} s ({service['plain'] / service['dcfx_enabled']:.2f}x).",
        "",
        "## Load",
        "",
        "Offered rates: "
        + ", ".join(f"{load:g}/s = {r:.2f} req/s" for load, r in zip(s["loads"], result["rates"], strict=True))
        + ".",
        "",
        "| rate (req/s) | arrived (req/s) | variant | throughput (req/s) | p50 (s) | p99 (s) | keeps up | "
        "calls x items | CPU busy | load |",
        "| ---: | ---: | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['offered_rate']:.2f} | {r['throughput'] / r['departures_over_arrivals']:.2f} | "
            f"{r['variant']} | {r['throughput']:.2f} | {r['p50_s']:.2f} | "
            f"{r['p99_s']:.2f} | {'yes' if r['keeps_up'] else 'no'} | {calls_text(r)} | {r['cpu_busy']:.2f} | "
            f"{r['load_avg_1m'][0]:.1f}-{r['load_avg_1m'][1]:.1f} |"
        )
    lines += [
        "",
        "Arrived: the arrival rate of the counted requests (each run's Poisson draw is scaled to make it the "
        "offered rate). "
        "Calls per run: for the diffusers variants, pipeline calls x requests per call; for dcfx, text-encoder calls "
        "x requests, U-Net full and shallow calls x live rows (two per request), VAE calls x requests.",
        "",
        "## The goal",
        "",
        f"Throughput at p99 <= {BASELINE}'s p99 at each rate where it keeps up, over its throughput (goal >= 2x; "
        "serve_load.throughput_at: the best kept-up measured rate within the bound, interpolated to the next).",
        "",
        *result["verdict"],
        "",
        "## The served images",
        "",
    ]
    for name, c in result["images"].items():
        lines.append(
            f"- {name}, request by request (same prompt and seed) over every rate: {c['bytes_equal']} of "
            f"{c['images']} PNGs byte-equal, {c['within_one_level']} within one level per pixel; largest difference "
            f"{c['max_level_diff']} level(s), in at most {c['max_share_of_pixels_differing']:.2%} of an image's pixels."
        )
    lines.append("")
    path.write_text("\n".join(lines))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in ((axes[0], "p50_s", "p50 latency"), (axes[1], "p99_s", "p99 latency")):
        for variant in VARIANTS:
            rows = [r for r in result["rows"] if r["variant"] == variant]
            ax.plot([r["throughput"] for r in rows], [r[key] for r in rows], marker="o", label=variant)
            for r in rows:
                if not r["keeps_up"]:
                    ax.plot(r["throughput"], r[key], marker="x", color="black", markersize=9)
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("seconds, arrival to PNG")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    s = result["scenario"]
    fig.suptitle(
        f"tiny SD pipeline, {s['steps']} DDIM steps, dcfx 1:{s['interval']} branch {s['branch']}, one core; "
        "x: the run fell behind its offered rate",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "dcfx": dcfx.__version__,
    }


def run_load(
    scenario: Scenario, pipes: Pipelines, rates: Sequence[float], log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[tuple[str, float], list[dict[str, Any]]]]:
    rows, runs = [], {}
    order = random.Random(scenario.seed)
    for rate in rates:
        for repeat in range(scenario.repeats):
            # The cores are shared: variants take turns in a new order each time, on the same arrivals.
            times = arrivals_at(rate, scenario.requests, scenario.warmup_requests, scenario.seed + repeat)
            for name in order.sample(VARIANTS, len(VARIANTS)):
                runs.setdefault((name, rate), []).append(run_variant(name, pipes, times))
        for name in VARIANTS:
            rows.append(variant_row(name, rate, runs[(name, rate)], scenario))
            log(describe(rows[-1]))
    return rows, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0.5,0.9,2", help="offered rates in requests per s (s: one plain request)")
    parser.add_argument("--requests", type=int, default=Scenario.requests, help="requests per run")
    parser.add_argument("--warmup-requests", type=int, default=Scenario.warmup_requests)
    parser.add_argument("--repeats", type=int, default=1, help="runs per rate and variant")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--sample-size", type=int, default=16)
    parser.add_argument(
        "--cpu", type=int, default=None, help="the core to pin to (default: the last allowed; -1: none)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: 10 requests per run")
    parser.add_argument("--out", default="docs/benchmarks/serve")
    args = parser.parse_args(argv)
    scenario = Scenario(
        loads=tuple(float(x) for x in args.loads.split(",")),
        requests=10 if args.quick else args.requests,
        warmup_requests=2 if args.quick else args.warmup_requests,
        repeats=args.repeats,
        steps=args.steps,
        interval=args.interval,
        sample_size=args.sample_size,
        share_requests=2 if args.quick else Scenario.share_requests,
    )
    if scenario.requests <= scenario.warmup_requests + 1:
        parser.error(f"--requests must exceed --warmup-requests + 1, got {scenario.requests}")
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(scenario.threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_sd_pipeline(Path(tmp) / "sd", "ddim", unet=build_unet(scenario))
        pipes = Pipelines(folder, scenario, log)
    shares = stage_shares(pipes.plain, scenario)
    log("stage shares of one plain request: " + ", ".join(f"{k} {v:.1%}" for k, v in shares["shares"].items()))
    service_requests = 3 if args.quick else 7
    service_s = {
        "plain": service_time(pipes.plain, scenario, service_requests),
        "dcfx_enabled": service_time(pipes.cached, scenario, service_requests),
    }
    rates = [load / service_s["plain"] for load in scenario.loads]
    log(f"s = {service_s['plain']:.3f} s (dcfx.enable: {service_s['dcfx_enabled']:.3f} s); rates {rates}")
    rows, runs = run_load(scenario, pipes, rates, log)
    images = check_images(runs, rates)
    result = {
        "scenario": dataclasses.asdict(scenario),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "pinned_cpu": cpu if cpu >= 0 else None,
            "torch_threads": torch.get_num_threads(),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        },
        "versions": versions(),
        "unet_params_m": sum(p.numel() for p in pipes.plain.unet.parameters()) / 1e6,
        "warmup_s": pipes.warmup_s,
        "stage_shares": shares,
        "service_requests": service_requests,
        "service_s": service_s,
        "rates": rates,
        "rows": rows,
        "images": images,
        "verdict": verdict(rows),
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_pipeline_load.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "serve_pipeline_load.md")
    plot(result, out / "serve_pipeline_load.png")
    print("\n".join(result["verdict"]))
    for name, c in images.items():
        print(f"{name}: {c}")
    log(f"wrote {out}/serve_pipeline_load.json, .md, .png in {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
