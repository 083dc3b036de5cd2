"""``dcfx demo``: the bundled digits model without and with DeepCache, timed, scored and drawn.

Generates the same digits (same seed, same DDIM steps) with the plain
U-Net and with ``dcfx.compile``, then reports the speedup of the denoising loop against the
FLOP-ideal one, the fidelity of the cached images to the uncached ones (PSNR) and the share of
each set the bundled classifier reads as the requested digit; a PNG puts both grids side by side.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import dcfx
from dcfx.branches import ideal_speedup_of_counts
from dcfx.digits import DEMO_PER_CLASS, IMAGE_SIZE, NUM_CLASSES, generate, load_classifier, load_model
from dcfx.quality import accuracy, psnr


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured: loop times (medians), step counts, r and the quality numbers."""

    base_s: float
    cached_s: float
    build_s: float
    full_steps: int
    shallow_steps: int
    flop_share: float
    psnr_db: float
    accuracy_base: float
    accuracy_cached: float

    @property
    def speedup(self) -> float:
        """The measured speedup of the denoising loop."""
        return self.base_s / self.cached_s

    @property
    def ideal(self) -> float:
        """The FLOP-ideal speedup of the steps that ran: steps / (full + shallow * r)."""
        return ideal_speedup_of_counts(self.full_steps, self.shallow_steps, self.flop_share)


def save_grid(panels: Sequence[tuple[str, torch.Tensor]], columns: int, path: str | Path, scale: int = 4) -> None:
    """Writes image panels (title, images (B, 1, H, W) in [-1, 1]) side by side as one PNG.

    Each panel is a grid of ``columns`` images per row under its title; pixels are enlarged
    ``scale`` times without smoothing, so every generated pixel stays visible.
    """
    tiles = []
    for title, images in panels:
        b, _, h, w = images.shape
        rows = -(-b // columns)
        grid = torch.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 0.5)
        pixels = ((images[:, 0].clamp(-1, 1) + 1) / 2).cpu()
        for i in range(b):
            r, c = divmod(i, columns)
            grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = pixels[i]
        tile = Image.fromarray((grid * 255).round().to(torch.uint8).numpy(), mode="L")
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        titled = Image.new("L", (tile.width, tile.height + 16), 255)
        titled.paste(tile, (0, 16))
        ImageDraw.Draw(titled).text((2, 2), title, fill=0)
        tiles.append(titled)
    gap = 12
    canvas = Image.new("L", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)), 255)
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + gap
    canvas.save(path)


def _median_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run_demo(
    *,
    branch: int = 0,
    interval: int = 5,
    steps: int = 50,
    per_class: int = DEMO_PER_CLASS,
    guidance: float = 1.0,
    repeats: int = 3,
    backend: str = "eager",
    out: str | Path = "dcfx_demo.png",
    seed: int = 0,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> DemoResult:
    """Returns the demo's measurements after writing the side-by-side grid to ``out``."""
    model = load_model()
    classifier, _, _ = load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    scheduler = model.scheduler()
    batch = len(labels) * (2 if guidance > 1 else 1)
    infos = dcfx.branches(model.unet, (batch, 1, IMAGE_SIZE, IMAGE_SIZE))
    if not 0 <= branch < len(infos):
        raise ValueError(f"branch {branch} is out of range for the digits model; valid: 0..{len(infos) - 1}")
    fast = dcfx.compile(model.unet, branch=branch, interval=interval, backend=backend, scheduler=scheduler)

    def run(unet: torch.nn.Module) -> torch.Tensor:
        return generate(unet, model.tokens, scheduler, labels, steps=steps, guidance=guidance, seed=seed)

    log(f"building dcfx graphs (capture, cut at branch {branch}, {backend} backend) ...")
    start = time.perf_counter()
    generate(fast, model.tokens, scheduler, labels, steps=2, guidance=guidance, seed=seed)
    build_s = time.perf_counter() - start
    log(f"timing {repeats} generations each of {len(labels)} digits, {steps} DDIM steps ...")
    base_s, base = _median_time(lambda: run(model.unet), repeats)
    fast.stats.update(full=0, shallow=0)
    cached_s, cached = _median_time(lambda: run(fast), repeats)
    with torch.no_grad():
        acc_base = accuracy(classifier(base), labels)
        acc_cached = accuracy(classifier(cached), labels)
    title = f"dcfx {backend}, branch {branch}, 1:{interval}: {base_s / cached_s:.2f}x"
    save_grid([("no cache", base), (title, cached)], NUM_CLASSES, out)
    return DemoResult(
        base_s=base_s,
        cached_s=cached_s,
        build_s=build_s,
        full_steps=fast.stats["full"] // repeats,
        shallow_steps=fast.stats["shallow"] // repeats,
        flop_share=infos[branch].flop_share,
        psnr_db=psnr(cached, base).mean().item(),
        accuracy_base=acc_base,
        accuracy_cached=acc_cached,
    )
