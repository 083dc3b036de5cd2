"""End-to-end speed of a Stable Diffusion v1.5 pipeline under DeepCache: dcfx against its peers and the FLOP limit.

One command times a StableDiffusionPipeline (SD1.5 configuration with random weights by default,
text encoder and VAE included; ``--model`` takes a local diffusers folder) at 256x256 (32x32
latents, classifier-free guidance: U-Net batch 2) for T DDIM steps, same prompt, seed and
scheduler everywhere, under each variant:

    nocache-eager      the plain U-Net
    nocache-compile    torch.compile(pipe.unet)
    helper             the official DeepCacheSDHelper (PyPI DeepCache)
    helper-compile     torch.compile(pipe.unet), then DeepCacheSDHelper
    dcfx-eager         dcfx.compile(..., backend="eager")
    dcfx-inductor      dcfx.compile(..., backend="inductor")
    dcfx-onnxruntime   dcfx.export(..., format="onnx") + dcfx.load
    dcfx-aoti          dcfx.export(..., format="aoti") + dcfx.load

for N in 2, 3, 5, 10 and branches 0, 1, 2. Per row: the denoising loop's and the whole pipeline's
wall time (median of ``--repeats``), the loop's speedup against no cache on the same backend, the
FLOP-ideal speedup of the steps that ran, measured/ideal, compile time, peak memory, and the
largest pixel difference from the official helper at the same N and branch.

Each variant runs in its own worker process (its memory is its own, and a failure of one, an
export without onnxruntime for example, is logged and recorded without stopping the others).
Inside a worker the rows go round-robin, so drift of the machine's speed hits them alike.
"Same backend" means: the plain U-Net for helper (timed in the helper's worker, helper off);
torch.compile without cache for helper-compile (from its worker); the same dcfx runtime at
interval 1 (every step full, the same compiled full graph) for dcfx variants.

Usage:
    python benchmarks/pipeline_speed.py                                  # everything: hours on 2 CPU cores
    python benchmarks/pipeline_speed.py --variants nocache-eager,helper,dcfx-eager --intervals 3 --branches 0
    python benchmarks/pipeline_speed.py --model small-sd --steps 6 --repeats 1     # a smoke run in a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from graph_speed import machine_info, write_results
from tqdm import tqdm

import dcfx
from dcfx.branches import ideal_speedup_of_counts
from dcfx.schedule import full_step_indices
from dcfx.zoo import CONFIGS, build_unet

VARIANTS_ORDER = (
    "nocache-eager",
    "nocache-compile",
    "helper",
    "helper-compile",
    "dcfx-eager",
    "dcfx-inductor",
    "dcfx-onnxruntime",
    "dcfx-aoti",
)
PROMPT = "a photograph of an astronaut riding a horse"
GOAL = 0.95  # dcfx inductor: measured / FLOP-ideal speedup at least this


@dataclass(frozen=True)
class Scenario:
    """What is measured: one pipeline, one resolution, T steps, the rows and the variants."""

    model: str = "sd15"
    size: int = 256
    steps: int = 20
    guidance: float = 7.5
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    branches: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS_ORDER
    repeats: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    limits: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (variant, branches): fewer branches for it

    def branches_of(self, variant: str) -> tuple[int, ...]:
        """Returns the branches timed for ``variant``: all, unless ``limits`` names fewer."""
        return dict(self.limits).get(variant, self.branches)

    def __post_init__(self) -> None:
        if self.model not in CONFIGS and not os.path.isdir(self.model):
            raise ValueError(f"--model {self.model!r} is neither a built-in config ({', '.join(CONFIGS)}) nor a folder")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS_ORDER)}")
        if any(n < 2 for n in self.intervals) or not self.intervals:
            raise ValueError(f"intervals must be >= 2 (1 is the no-cache row), got {self.intervals}")
        if any(b < 0 for b in self.branches) or not self.branches:
            raise ValueError(f"branches must be >= 0, got {self.branches}")
        if self.size % 64:
            raise ValueError(f"size must be a multiple of 64 px (8x VAE, three U-Net downsamplings), got {self.size}")
        if self.steps < 2 or self.repeats < 1:
            raise ValueError(f"need steps >= 2 and repeats >= 1, got {self.steps}, {self.repeats}")
        for name, branches in self.limits:
            if name not in self.variants or not set(branches) <= set(self.branches) or not branches:
                raise ValueError(f"--limit {name}:{branches}: need a chosen variant and some of {self.branches}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def stem(self) -> str:
        """The file name (no suffix) of this scenario's results."""
        name = Path(self.model).name if os.path.isdir(self.model) else self.model
        return f"pipeline_{name}_{self.size}px_{self.steps}steps_{self.device}"


def log(message: str) -> None:
    tqdm.write(f"[pipeline_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The pipeline


def _tokenizer() -> Any:
    """A CLIP tokenizer over the 256 byte-level symbols: no vocabulary download, real tokenization."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_pipeline(scenario: Scenario) -> Any:
    """Returns the StableDiffusionPipeline of the scenario: a local folder, or SD1.5's layout with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = getattr(torch, scenario.dtype)
    if os.path.isdir(scenario.model):
        pipe = StableDiffusionPipeline.from_pretrained(scenario.model, safety_checker=None, torch_dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        torch.manual_seed(scenario.seed)
        small = scenario.model != "sd15"
        text = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64 if small else 768,
            intermediate_size=128 if small else 3072,
            num_hidden_layers=2 if small else 12,
            num_attention_heads=4 if small else 12,
            max_position_embeddings=77,
            projection_dim=64 if small else 768,
        )
        vae = AutoencoderKL(  # four levels either way: 8x downsampling, as SD's
            block_out_channels=(8, 8, 16, 16) if small else (128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8 if small else 32,
            latent_channels=4,
            layers_per_block=2,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(text),
            tokenizer=_tokenizer(),
            unet=build_unet(scenario.model, seed=scenario.seed),
            scheduler=DDIMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.vae.config.scaling_factor = 0.18215
    pipe = pipe.to(scenario.device, dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _PeakMemory:
    """Samples the process's RSS (CPU) or CUDA's allocator peak while a generation runs."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> _PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


@dataclass
class Generation:
    """One timed pipeline call: the whole call, its denoising loop, the peak memory and the image."""

    total_s: float
    loop_s: float
    peak_bytes: int
    image: np.ndarray


def generate(pipe: Any, scenario: Scenario, steps: int | None = None) -> Generation:
    """Returns one timed generation. The loop runs from the U-Net's first call to the last step's end."""
    marks: dict[str, float] = {}

    def first_call(module: Any, args: Any) -> None:
        marks.setdefault("loop_start", time.perf_counter())

    def step_end(pipe_: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        marks["loop_end"] = time.perf_counter()
        return {}

    sync = torch.cuda.synchronize if scenario.device.startswith("cuda") else (lambda: None)
    hook = pipe.unet.register_forward_pre_hook(first_call)
    try:
        with _PeakMemory(scenario.device) as mem:
            sync()
            start = time.perf_counter()
            out = pipe(
                PROMPT,
                num_inference_steps=steps or scenario.steps,
                guidance_scale=scenario.guidance,
                height=scenario.size,
                width=scenario.size,
                generator=torch.Generator().manual_seed(scenario.seed),
                output_type="np",
                callback_on_step_end=step_end,
            )
            sync()
            total = time.perf_counter() - start
    finally:
        hook.remove()
    return Generation(total, marks["loop_end"] - marks["loop_start"], mem.peak, out.images[0])


def graphs_compiled() -> int:
    """Returns how many graphs torch.compile (Dynamo) has compiled in this process so far.

    Reads Dynamo's own statistics counter, a private API (checked on torch 2.13): the one place
    the benchmarks touch torch internals, to show recompilation, which no public API counts.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------------------------
# Variants: how each peer caches. A registry, one small class per variant.


class Variant:
    """A way to run the pipeline. ``configure(interval, branch)`` switches rows; interval 1 is no cache.

    ``own_baseline``: the variant can time its own no-cache row (interval 1) in its worker;
    otherwise ``baseline`` names the variant whose no-cache row it is measured against.
    """

    name: ClassVar[str]
    cached: ClassVar[bool] = True
    warmup_steps: ClassVar[int | None] = 2  # None: a whole generation
    own_baseline: ClassVar[bool] = True
    baseline: ClassVar[str | None] = None

    def __init__(self, pipe: Any, scenario: Scenario, workdir: Path) -> None:
        self.pipe, self.scenario, self.workdir = pipe, scenario, workdir
        self.unet = pipe.unet

    def start_branch(self, branch: int) -> None:
        """Prepares the graphs of one branch (the first generation compiles, where the variant compiles)."""

    def configure(self, interval: int, branch: int) -> None:
        """Switches to 1:interval at ``branch`` (interval 1: every step full)."""

    def end_branch(self) -> None:
        """Drops the branch's graphs."""


class NoCacheEager(Variant):
    name, cached = "nocache-eager", False


class NoCacheCompile(Variant):
    name, cached = "nocache-compile", False

    def __init__(self, pipe: Any, scenario: Scenario, workdir: Path) -> None:
        super().__init__(pipe, scenario, workdir)
        pipe.unet = torch.compile(self.unet)


class Helper(Variant):
    name = "helper"

    def __init__(self, pipe: Any, scenario: Scenario, workdir: Path) -> None:
        super().__init__(pipe, scenario, workdir)
        from DeepCache import DeepCacheSDHelper

        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.enabled = False

    def configure(self, interval: int, branch: int) -> None:
        if self.enabled:
            self.helper.disable()
            self.enabled = False
        if interval > 1:
            self.helper.set_params(cache_interval=interval, cache_branch_id=branch)
            self.helper.enable()
            self.enabled = True


class HelperCompile(Helper):
    """torch.compile(pipe.unet) first, then the helper: what a user trying both gets."""

    name, own_baseline, baseline = "helper-compile", False, "nocache-compile"
    warmup_steps = None  # it recompiles step after step: the whole first generation is its warm-up

    def __init__(self, pipe: Any, scenario: Scenario, workdir: Path) -> None:
        pipe.unet = torch.compile(pipe.unet)
        super().__init__(pipe, scenario, workdir)


class DcfxBackend(Variant):
    """dcfx.compile with a registered in-process backend: one runtime per branch, reschedule per row."""

    backend: ClassVar[str]

    def start_branch(self, branch: int) -> None:
        self.pipe.unet = dcfx.compile(
            self.unet, branch=branch, interval=1, backend=self.backend, scheduler=self.pipe.scheduler
        )

    def configure(self, interval: int, branch: int) -> None:
        self.pipe.unet.reschedule(interval=interval)

    def end_branch(self) -> None:
        self.pipe.unet = self.unet
        gc.collect()


class DcfxEager(DcfxBackend):
    name, backend = "dcfx-eager", "eager"


class DcfxInductor(DcfxBackend):
    name, backend = "dcfx-inductor", "inductor"


class DcfxExport(DcfxBackend):
    """dcfx.export to a deployment format, then dcfx.load: the runtime over the exported graphs."""

    format: ClassVar[str]

    def start_branch(self, branch: int) -> None:
        latent = self.scenario.size // self.pipe.vae_scale_factor
        self.out = out = self.workdir / f"{self.format}_b{branch}"
        dcfx.export(
            self.unet,
            out,
            format=self.format,
            branch=branch,
            interval=2,
            shapes={"batch": 2, "height": latent, "width": latent},
            dtype=getattr(torch, self.scenario.dtype),
            overwrite=True,
        )
        self.pipe.unet = dcfx.load(out, scheduler=self.pipe.scheduler, device=self.scenario.device, interval=1)

    def end_branch(self) -> None:
        super().end_branch()
        shutil.rmtree(self.out, ignore_errors=True)


class DcfxOnnxruntime(DcfxExport):
    name, format = "dcfx-onnxruntime", "onnx"


class DcfxAoti(DcfxExport):
    name, format = "dcfx-aoti", "aoti"


VARIANTS: dict[str, type[Variant]] = {
    v.name: v
    for v in (
        NoCacheEager,
        NoCacheCompile,
        Helper,
        HelperCompile,
        DcfxEager,
        DcfxInductor,
        DcfxOnnxruntime,
        DcfxAoti,
    )
}


# ---------------------------------------------------------------------------------------------
# The worker: one variant, every row, round-robin


@dataclass
class RowTimes:
    """The timed generations of one (interval, branch) row of a variant."""

    interval: int
    branch: int | None
    total_s: list[float] = field(default_factory=list)
    loop_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)


def run_worker(scenario: Scenario, name: str, out: Path) -> None:
    """Times every row of variant ``name``; writes out/NAME.json and out/NAME_images.npz.

    Per branch: prepare it (exports happen here), then one untimed warm-up generation with
    caching on (``warmup_steps`` steps: captures and compiles both graphs), then ``repeats``
    round-robin rounds over the branch's rows. The no-cache row (interval 1) is timed with the
    first branch only: a variant's full graph does the same work whatever the branch.
    """
    torch.manual_seed(scenario.seed)
    log(f"{name}: building the pipeline")
    pipe = build_pipeline(scenario)
    workdir = Path(tempfile.mkdtemp(prefix=f"dcfx_bench_{name}_"))
    variant = VARIANTS[name](pipe, scenario, workdir)
    base_rss = _PeakMemory.rss()
    rows: list[RowTimes] = []
    first_use: dict[str, dict[str, float]] = {}
    images: dict[str, np.ndarray] = {}
    groups: list[int | None] = list(scenario.branches_of(name)) if variant.cached else [None]
    plans = [_row_plan(variant, scenario, first=i == 0) for i in range(len(groups))]
    bar = tqdm(total=sum(len(p) for p in plans) * scenario.repeats + len(groups), desc=name, file=sys.stderr)
    try:
        for branch, plan in zip(groups, plans, strict=True):
            graphs_before = graphs_compiled()
            start = time.perf_counter()
            variant.start_branch(branch or 0)
            setup = time.perf_counter() - start
            variant.configure(scenario.intervals[0] if variant.cached else 1, branch or 0)
            warm_steps = variant.warmup_steps or scenario.steps
            warm = generate(pipe, scenario, steps=warm_steps).total_s
            first_use[str(branch)] = {"setup_s": setup, "warmup_s": warm, "warmup_steps": warm_steps}
            bar.update()
            group = [RowTimes(n, branch) for n in plan]
            for _ in range(scenario.repeats):
                for row in group:
                    variant.configure(row.interval, branch or 0)
                    gen = generate(pipe, scenario)
                    bar.update()
                    row.total_s.append(gen.total_s)
                    row.loop_s.append(gen.loop_s)
                    row.peak_bytes.append(gen.peak_bytes - (0 if scenario.device.startswith("cuda") else base_rss))
                    images[f"{row.interval}_{row.branch}"] = gen.image
            first_use[str(branch)]["graphs_compiled"] = graphs_compiled() - graphs_before
            rows += group
            done = ", ".join(f"1:{r.interval} {statistics.median(r.loop_s):.2f} s" for r in group)
            log(f"{name}: branch {branch}: loop medians {done}")
            variant.end_branch()
    finally:
        bar.close()
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {"rows": [asdict(r) for r in rows], "first_use": first_use}
    (out / f"{name}.json").write_text(json.dumps(payload) + "\n")
    np.savez_compressed(out / f"{name}_images.npz", **images)


def _row_plan(variant: Variant, scenario: Scenario, first: bool) -> list[int]:
    if not variant.cached:
        return [1]
    return ([1] if variant.own_baseline and first else []) + list(scenario.intervals)


# ---------------------------------------------------------------------------------------------
# The driver: workers, FLOP shares, the table, the plot


def flop_shares(scenario: Scenario) -> dict[int, float]:
    """Returns r of each requested branch (dcfx.branches on the scenario's U-Net input shape)."""
    pipe_unet = build_pipeline(scenario).unet if os.path.isdir(scenario.model) else build_unet(scenario.model)
    latent = scenario.size // 8
    infos = dcfx.branches(pipe_unet, (2, pipe_unet.config.in_channels, latent, latent))
    bad = [b for b in scenario.branches if b >= len(infos)]
    if bad:
        raise ValueError(f"branch(es) {bad} out of range; valid: 0..{len(infos) - 1}")
    return {b: infos[b].flop_share for b in scenario.branches}


def summarise(scenario: Scenario, results: dict[str, Any], shares: dict[int, float], out: Path) -> list[dict[str, Any]]:
    """Returns one row per (variant, interval, branch) with speedups, ideal, first-use time, memory, diff."""
    done = {name: payload for name, payload in results.items() if isinstance(payload, dict)}
    no_cache = {name: r for name, p in done.items() for r in p["rows"] if r["interval"] == 1}
    helper_images = _images(out, "helper")
    eager = no_cache.get("nocache-eager")
    table = []
    for name in scenario.variants:
        if name not in done:
            continue
        variant = VARIANTS[name]
        base = no_cache.get(name if (variant.own_baseline or not variant.cached) else variant.baseline)
        images = _images(out, name)
        for r in done[name]["rows"]:
            loop = statistics.median(r["loop_s"])
            total = statistics.median(r["total_s"])
            first = done[name]["first_use"][str(r["branch"])]
            row: dict[str, Any] = {
                "variant": name,
                "interval": r["interval"],
                "branch": r["branch"],
                "loop_median_s": loop,
                "total_median_s": total,
                "loop_s": r["loop_s"],
                "total_s": r["total_s"],
                "speedup": statistics.median(base["loop_s"]) / loop if base else None,
                "speedup_vs_nocache_eager": statistics.median(eager["loop_s"]) / loop if eager else None,
                "total_speedup_vs_nocache_eager": statistics.median(eager["total_s"]) / total if eager else None,
                "first_use_s": first["setup_s"] + first["warmup_s"],
                "warmup_steps": first["warmup_steps"],
                "graphs_compiled": first["graphs_compiled"],
                "peak_mb": max(r["peak_bytes"]) / 2**20,
            }
            if r["branch"] is not None and r["interval"] > 1:
                config = dcfx.DeepCacheConfig(branch=r["branch"], interval=r["interval"])
                full = len(full_step_indices(config, scenario.steps))
                ideal = ideal_speedup_of_counts(full, scenario.steps - full, shares[r["branch"]])
                row |= {"r": shares[r["branch"]], "ideal": ideal}
                row["measured_over_ideal"] = row["speedup"] / ideal if row["speedup"] else None
                key = f"{r['interval']}_{r['branch']}"
                if helper_images is not None and images is not None and key in helper_images:
                    row["max_diff_vs_helper"] = float(np.abs(images[key] - helper_images[key]).max())
            table.append(row)
    return table


def _images(out: Path, name: str) -> dict[str, np.ndarray] | None:
    path = out / f"{name}_images.npz"
    return dict(np.load(path)) if path.exists() else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(scenario: Scenario, table: list[dict[str, Any]], results: dict[str, Any], machine: dict[str, Any]) -> str:
    """Returns the results as markdown: the table per branch, then the notes needed to read it."""
    lines = [
        f"# Pipeline speed: {scenario.model}, {scenario.size}x{scenario.size} px, {scenario.steps} DDIM steps, "
        f"CFG (U-Net batch 2), {scenario.dtype}, {scenario.device}",
        "",
        f"Machine: {machine['processor']}, {machine['torch_num_threads']} torch threads; torch {machine['torch']}, "
        f"diffusers {machine['diffusers']}. Median of {scenario.repeats} generations per row.",
        "",
        "| variant | N | branch | loop s | pipeline s | speedup (same backend) | FLOP-ideal | measured/ideal "
        "| vs no-cache eager | first use s | graphs compiled | peak MB | max diff vs helper |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(
        table,
        key=lambda r: (-1 if r["branch"] is None else r["branch"], r["interval"], VARIANTS_ORDER.index(r["variant"])),
    ):
        lines.append(
            f"| {row['variant']} | {row['interval']} | {_fmt(row['branch'], 'd')} | {row['loop_median_s']:.2f} "
            f"| {row['total_median_s']:.2f} | {_fmt(row['speedup'], '.2f', 'x')} "
            f"| {_fmt(row.get('ideal'), '.2f', 'x')} "
            f"| {_fmt(row.get('measured_over_ideal'), '.2f')} | {_fmt(row['speedup_vs_nocache_eager'], '.2f', 'x')} "
            f"| {row['first_use_s']:.1f} | {row['graphs_compiled']} | {row['peak_mb']:.0f} "
            f"| {_fmt(row.get('max_diff_vs_helper'), '.1e')} |"
        )
    lines += [f"- {v} was timed at branch(es) {list(b)} only." for v, b in scenario.limits]
    lines += ["", *verdict(table)]
    failed = {k: v for k, v in results.items() if not isinstance(v, dict)}
    lines += [""] + [f"- **{k} failed**: {v}" for k, v in failed.items()]
    lines += [
        "",
        "- loop s: from the U-Net's first call to the end of the last step; pipeline s: the whole call (text "
        "encoder, loop, VAE decode, post-processing).",
        "- speedup (same backend): loop time of no cache on the same backend over this row's. For dcfx variants "
        "the no-cache row is the same runtime at N = 1 (every step runs the same compiled full graph); for helper, "
        "the plain U-Net in its worker; for helper-compile, nocache-compile's row (another worker).",
        "- FLOP-ideal: (full + shallow) / (full + shallow r) for the steps a uniform 1:N schedule runs in "
        f"{scenario.steps} steps; r from dcfx.branches. measured/ideal: speedup / FLOP-ideal.",
        "- first use s: preparing the branch (exports) and the untimed warm-up generation with caching on: "
        "capture and compile (torch.compile, Inductor) happen there. The warm-up runs 2 steps (one full, one "
        "shallow), except helper-compile's, a whole generation: it recompiles step after step.",
        "- graphs compiled: graphs torch.compile compiled for the variant's branch, all its rows and "
        "generations included (Dynamo's counter; eager variants 0). A recompile is one more graph.",
        "- no-cache rows (N = 1) are timed with the first branch only; the full graph's work does not depend on it.",
        "- peak MB: CPU: the largest RSS during a timed generation above the worker's RSS once the pipeline is "
        "built (graphs, compiled code and export sessions count); CUDA: torch.cuda.max_memory_allocated.",
        "- max diff vs helper: largest absolute difference of the output image (0..1) from helper's at the "
        "same N and branch.",
    ]
    return "\n".join(lines)


def verdict(table: list[dict[str, Any]]) -> list[str]:
    """Returns the goal checks: dcfx inductor against its FLOP-ideal, dcfx against every peer per row."""
    lines = []
    inductor = [r for r in table if r["variant"] == "dcfx-inductor" and r.get("measured_over_ideal")]
    if inductor:
        met = [r for r in inductor if r["measured_over_ideal"] >= GOAL]
        worst = min(inductor, key=lambda r: r["measured_over_ideal"])
        lines.append(
            f"- dcfx-inductor reaches {GOAL:.0%} of its FLOP-ideal speedup in {len(met)} of {len(inductor)} rows "
            f"(lowest: {worst['measured_over_ideal']:.2f} at N={worst['interval']}, branch {worst['branch']})."
        )
    cached = [r for r in table if r["branch"] is not None and r["interval"] > 1]
    peers = [r for r in table if not r["variant"].startswith("dcfx")]
    wins, total = 0, 0
    losses = []
    for key in sorted({(r["interval"], r["branch"]) for r in cached if r["variant"].startswith("dcfx")}):
        ours = min(
            (r for r in cached if (r["interval"], r["branch"]) == key and r["variant"].startswith("dcfx")),
            key=lambda r: r["loop_median_s"],
        )
        for peer in peers:
            if peer["interval"] == 1 and peer["variant"].startswith("helper"):
                continue
            if peer["branch"] is not None and (peer["interval"], peer["branch"]) != key:
                continue
            total += 1
            if ours["loop_median_s"] < peer["loop_median_s"]:
                wins += 1
            else:
                losses.append(f"{peer['variant']} at N={key[0]}, branch {key[1]}")
    if total:
        lines.append(
            f"- The fastest dcfx variant beats the peer in {wins} of {total} comparisons at the same N and branch "
            f"(peers: no cache, helper, helper-compile)" + (f"; not against: {', '.join(losses)}." if losses else ".")
        )
    return lines


def plot(scenario: Scenario, table: list[dict[str, Any]], path: Path) -> None:
    """Writes speedup against N, one panel per branch, a line per variant, the FLOP-ideal dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(scenario.branches), 4), layout="constrained")
    axes = fig.subplots(1, len(scenario.branches), squeeze=False)[0]
    for ax, branch in zip(axes, scenario.branches, strict=True):
        rows = [r for r in table if r["branch"] == branch and r["interval"] > 1]
        ideal = sorted({(r["interval"], r["ideal"]) for r in rows})
        if ideal:
            ax.plot(*zip(*ideal, strict=True), "k--", lw=1.2, label="FLOP-ideal")
        for name in scenario.variants:
            mine = sorted((r["interval"], r["speedup"]) for r in rows if r["variant"] == name and r["speedup"])
            if mine:
                ax.plot(*zip(*mine, strict=True), "o-", label=name)
        ax.set(xlabel="N (1:N)", ylabel="loop speedup vs no cache, same backend", title=f"branch {branch}")
        ax.set_xticks(scenario.intervals)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{scenario.model}, {scenario.size}px, {scenario.steps} steps, {scenario.device}", fontsize=10)
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, Path, argparse.Namespace]:
    """Returns the scenario, the output directory and the raw arguments."""
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=d.model, help=f"built-in U-Net config ({', '.join(CONFIGS)}) or a diffusers folder"
    )
    p.add_argument("--size", type=int, default=d.size, help="image height and width in pixels")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--intervals", default=",".join(map(str, d.intervals)))
    p.add_argument("--branches", default=",".join(map(str, d.branches)))
    p.add_argument("--variants", default=",".join(d.variants), help=f"of {', '.join(VARIANTS_ORDER)}")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline_speed"))
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="VARIANT:B,B",
        help="time VARIANT at these branches only (repeatable), e.g. helper-compile:0",
    )
    p.add_argument("--summarise-only", action="store_true", help="rebuild the table from the workers' files in --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x.strip())  # noqa: E731
    scenario = Scenario(
        model=args.model,
        size=args.size,
        steps=args.steps,
        guidance=args.guidance,
        intervals=ints(args.intervals),
        branches=ints(args.branches),
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        repeats=args.repeats,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        limits=tuple((v, ints(b)) for v, b in (item.split(":", 1) for item in args.limit)),
    )
    return scenario, args.out, args


def main(argv: list[str] | None = None) -> None:
    scenario, out, args = parse_args(argv)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_worker(scenario, args.worker, raw)
        return
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    log("FLOP shares of the requested branches (dcfx.branches)")
    shares = flop_shares(scenario)
    results: dict[str, Any] = {}
    for name in scenario.variants:
        if args.summarise_only:
            path = raw / f"{name}.json"
            results[name] = json.loads(path.read_text()) if path.exists() else "not run (no worker file)"
            continue
        for stale in (raw / f"{name}.json", raw / f"{name}_images.npz"):
            stale.unlink(missing_ok=True)
        log(f"worker {name}")
        start = time.perf_counter()
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", name]
        proc = subprocess.run(cmd, stderr=None, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not (raw / f"{name}.json").exists():
            results[name] = f"worker exited with {proc.returncode}; its stderr is above"
            log(f"{name} FAILED (exit {proc.returncode}); continuing with the others")
            continue
        results[name] = json.loads((raw / f"{name}.json").read_text())
        log(f"{name} done in {time.perf_counter() - start:.0f} s")
    table = summarise(scenario, results, shares, raw)
    machine["loadavg_end"] = os.getloadavg()
    md = markdown(scenario, table, results, machine)
    result = {
        "benchmark": "pipeline_speed",
        "started": started,
        "scenario": asdict(scenario),
        "settings": {"prompt": PROMPT, "scheduler": "DDIMScheduler", "flop_shares": shares, "goal": GOAL},
        "machine": machine,
        "failed": {k: v for k, v in results.items() if not isinstance(v, dict)},
        "rows": table,
    }
    write_results(out, scenario.stem, result, md, lambda path: plot(scenario, table, path), log)


if __name__ == "__main__":
    main()
