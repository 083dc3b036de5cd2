"""Diffusion transformers under the block-range cut: dcfx against cache-dit and the FLOP limit.

One command times a transformer pipeline's denoising loop (``output_type="latent"``: no VAE, no
text encoders, prompt embeddings passed in; classifier-free guidance on where the pipeline has
it) for T steps, same seed and scheduler everywhere, under each variant:

    plain-eager        the plain transformer
    cachedit-eager     cache-dit 1.5.3 DBCache, F and B as dcfx's, steps_computation_mask of
                       dcfx's uniform 1:N schedule, policy "static"
    dcfx-eager         dcfx.compile(first=F, last=B, interval=N), eager graphs
    plain-compile      torch.compile(pipe.transformer)
    cachedit-compile   cache-dit as above, then cache_dit.set_compile_configs() and
                       torch.compile(pipe.transformer), as cache-dit's documentation does
    dcfx-inductor      dcfx.compile(..., backend="inductor"): its defaults (freezing, weights not
                       prepacked: one copy of the weights per process)
    dcfx-inductor-prepack   the same with options={"cpp.weight_prepack": True,
                       "layout_optimization": True} (faster CPU linears, a weight copy per shape)
    dcfx-inductor-cdconfig  cache_dit.set_compile_configs() (cache-dit's global Inductor settings),
                       then dcfx-inductor: both compiled under the same settings

Each variant runs in a fresh process (cache-dit's compile settings are global, compile caches
are per process); inside it, one warm-up generation (compiling where the variant compiles) and
then ``--repeats`` timed ones, median reported. Per row: the loop's median time, the speedup
against the same backend without cache (plain-eager for the eager variants, plain-compile for
the compiled ones), the FLOP-ideal speedup of the steps that ran (N / (1 + (N - 1) r) over the
schedule's full and cached steps, r from ``dcfx.branches`` on the pipeline's own call),
measured/ideal, and the largest difference of the latents from cache-dit's at the same setting.

Models: the tiny test configs (``sd3``, ``flux``, ``pixart``, ``dit``, ``sana``, ``wan``; from
tests/transformers/tiny.py; Python overhead dominates their loops), ``pixart-medium`` (12 blocks,
width 384: compute-bound on a CPU) and ``pixart-alpha``: PixArt-alpha's size (28 blocks, width
1152), both with 120 T5 tokens of 4096 and random weights at 256x256 (32x32 latents), and
``dit-xl``: DiT-XL/2's size (28 blocks, width 1152, class-conditional) at 256x256.

Usage:
    python benchmarks/transformer_speed.py --models sd3,flux,pixart,dit --steps 20 --repeats 5
    python benchmarks/transformer_speed.py --models pixart-medium --steps 20 --repeats 3
    python benchmarks/transformer_speed.py --models pixart-alpha --steps 10 --repeats 3    # hours on 2 cores
    python benchmarks/transformer_speed.py --models dit-xl --steps 10 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = (
    *("plain-eager", "cachedit-eager", "dcfx-eager", "plain-compile", "cachedit-compile", "dcfx-inductor"),
    *("dcfx-inductor-prepack", "dcfx-inductor-cdconfig"),
)
BASELINE = {
    "cachedit-eager": "plain-eager",
    "dcfx-eager": "plain-eager",
    "cachedit-compile": "plain-compile",
    "dcfx-inductor": "plain-compile",
    "dcfx-inductor-prepack": "plain-compile",
    "dcfx-inductor-cdconfig": "plain-compile",
}
PREPACK = {"cpp.weight_prepack": True, "layout_optimization": True}


# Sized PixArt configs: (blocks, heads, head dim). PixArt-alpha's own: 28 blocks of width 1152;
# "medium": 12 blocks of width 384, where the loop is compute-bound on a CPU (about 0.25 s per
# guided call of 32x32 latents on 2 cores) and a run takes minutes. The stand-in VAE has one
# block (1 pixel per latent pixel): the call asks for 32x32 pixels so that the latents are
# PixArt's at 256x256 (an 8x VAE), not 256x256 latents (64 times the tokens).
PIXART_SIZES = {"pixart-alpha": (28, 16, 72), "pixart-medium": (12, 6, 64)}


def pixart_sized(name: str) -> Any:
    """A PixArt transformer of ``PIXART_SIZES[name]`` with random weights at 256x256, in its pipeline
    (no text encoder, no VAE run)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from tests.transformers.tiny import Tiny, _vae

    layers, heads, head_dim = PIXART_SIZES[name]
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=layers,
        patch_size=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=heads * head_dim,
        caption_channels=4096,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    ).eval()
    pipe = PixArtAlphaPipeline(
        transformer=transformer, scheduler=DPMSolverMultistepScheduler(), vae=_vae(4), text_encoder=None, tokenizer=None
    )
    g = torch.Generator().manual_seed(1)
    side = 32 * pipe.vae_scale_factor  # 32x32 latents: 256x256 pixels under PixArt's VAE (8 per latent pixel)
    call = {
        "prompt_embeds": torch.randn(1, 120, 4096, generator=g),
        "prompt_attention_mask": torch.ones(1, 120, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(1, 120, 4096, generator=g),
        "negative_prompt_attention_mask": torch.ones(1, 120, dtype=torch.long),
        "guidance_scale": 4.5,
        "height": side,
        "width": side,
        "use_resolution_binning": False,
        "negative_prompt": None,
    }
    return Tiny(name, pipe, call)


def dit_xl() -> Any:
    """DiT-XL/2's transformer (28 blocks of width 1152, patch 2) with random weights at 256x256
    (32x32 latents), one class label guided (batch 2 per call), in its pipeline."""
    import dataclasses

    from tests.transformers.tiny import dit

    sized = dit(layers=28, sample_size=32, heads=16, head_dim=72, labels=(207,))
    return dataclasses.replace(sized, name="dit-xl")


def build(model: str) -> Any:
    if model in PIXART_SIZES:
        return pixart_sized(model)
    if model == "dit-xl":
        return dit_xl()
    from tests.transformers.tiny import BUILDERS

    return BUILDERS[model]()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one variant of one model in this process; returns its timings and latents' summary."""
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import dcfx
    from dcfx.schedule import full_step_indices

    tiny = build(spec["model"])
    tiny.pipe.set_progress_bar_config(disable=True)
    variant, steps = spec["variant"], spec["steps"]
    first, last, interval = spec["first"], spec["last"], spec["interval"]
    full = full_step_indices(dcfx.DeepCacheConfig(first=first, last=last, interval=interval), steps)
    mask = [int(i in full) for i in range(steps)]
    start = time.perf_counter()
    if variant.startswith("cachedit"):
        import cache_dit

        cache_dit.enable_cache(
            tiny.pipe,
            cache_config=tiny.cache_dit_config(first, last, mask),
        )
        if variant.endswith("compile"):
            cache_dit.set_compile_configs()
            tiny.pipe.transformer = torch.compile(tiny.pipe.transformer)
    elif variant == "plain-compile":
        tiny.pipe.transformer = torch.compile(tiny.pipe.transformer)
    elif variant == "dcfx-eager":
        dcfx.enable(tiny.pipe, first=first, last=last, interval=interval)
    elif variant.startswith("dcfx-inductor"):
        options = {"options": PREPACK} if variant == "dcfx-inductor-prepack" else {}
        if variant == "dcfx-inductor-cdconfig":
            import cache_dit

            cache_dit.set_compile_configs()
        dcfx.enable(tiny.pipe, first=first, last=last, interval=interval, backend="inductor", **options)
    warm = tiny.generate(steps, seed=0)
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(spec["repeats"]):
        tick = time.perf_counter()
        out = tiny.generate(steps, seed=0)
        times.append(time.perf_counter() - tick)
    result = {"warm_up_s": warm_s, "loop_s": statistics.median(times), "times": times}
    result["deterministic"] = bool(torch.equal(out, warm))
    torch.save(out, spec["latents"])
    if variant == "plain-eager":  # the FLOP share r of the cut on the pipeline's own call
        from dcfx.branches import block_ranges_of_call

        seen: dict[str, Any] = {}

        def hook(module: Any, args: Any, kwargs: Any) -> None:
            import inspect

            seen.setdefault("call", dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments))

        handle = tiny.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        tiny.generate(2, seed=0)  # (DPM-Solver++ cannot run a single step)
        handle.remove()
        call = {k: v for k, v in seen["call"].items() if k != "return_dict"}
        infos = {(i.first, i.last): i for i in block_ranges_of_call(tiny.transformer, call)}
        result["flop_share"] = infos[(first, last)].flop_share
    result["full_steps"], result["cached_steps"] = len(full), steps - len(full)
    return result


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": done.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="sd3,flux,pixart,dit")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--last", type=int, default=0)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/transformer_speed")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch
    from graph_speed import machine_info

    from dcfx.branches import ideal_speedup_of_counts

    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for model in args.models.split(","):
        results: dict[str, dict[str, Any]] = {}
        for variant in args.variants.split(","):
            spec = {
                "model": model,
                "variant": variant,
                "first": args.first,
                "last": args.last,
                "interval": args.interval,
                "steps": args.steps,
                "repeats": args.repeats,
                "threads": args.threads,
                "latents": str(tmp / f"dcfx-bench-{model}-{variant}.pt"),
            }
            Path(spec["latents"]).unlink(missing_ok=True)  # no stale latents of an earlier run compared
            print(f"{model} {variant} ...", file=sys.stderr, flush=True)
            results[variant] = run_variant(spec)
            if "error" in results[variant]:
                print(results[variant]["error"], file=sys.stderr)
        share = results.get("plain-eager", {}).get("flop_share")
        for variant, r in results.items():
            if "error" in r:
                rows.append({"model": model, "variant": variant, "error": r["error"][-300:]})
                continue
            row = {"model": model, "variant": variant, "loop_s": r["loop_s"], "warm_up_s": r["warm_up_s"]}
            base = results.get(BASELINE.get(variant, ""), {})
            if "loop_s" in base:
                row["speedup"] = base["loop_s"] / r["loop_s"]
                if share is not None:
                    row["ideal"] = ideal_speedup_of_counts(r["full_steps"], r["cached_steps"], share)
                    row["of_ideal"] = row["speedup"] / row["ideal"]
            peer = "cachedit-compile" if ("compile" in variant or "inductor" in variant) else "cachedit-eager"
            mine = Path(tmp / f"dcfx-bench-{model}-{variant}.pt")
            theirs = Path(tmp / f"dcfx-bench-{model}-{peer}.pt")
            if variant.startswith("dcfx") and mine.exists() and theirs.exists():
                a, b = torch.load(mine), torch.load(theirs)
                row["vs_cachedit"] = float((a - b).abs().max() / b.abs().max())
            row["flop_share"] = share
            rows.append(row)
    table = table_of(args, rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"transformer_speed_{'_'.join(args.models.split(','))}"
    (args.out / f"{stem}.md").write_text(table + "\n")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def table_of(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Transformer denoising loop, F{args.first}B{args.last}, uniform 1:{args.interval}, {args.steps} steps, "
        f"median of {args.repeats}, {args.threads} threads",
        "",
        "| model | variant | loop s | speedup | ideal | of ideal | r | max rel. diff to cache-dit | warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get(key) is not None else ""

    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['variant']} | failed: {row['error'][-80:]!r} | | | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['loop_s']:.3f} | {cell(row, 'speedup', '.2f')} | "
            f"{cell(row, 'ideal', '.2f')} | {cell(row, 'of_ideal', '.2f')} | {cell(row, 'flop_share', '.3f')} | "
            f"{cell(row, 'vs_cachedit', '.1e')} | {row['warm_up_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
