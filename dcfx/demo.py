"""``dcfx demo``: a bundled digits model without and with DeepCache, timed, scored and drawn.

Generates the same digits (same seed, same DDIM steps) with the plain model and with
``dcfx.compile``, then reports the speedup of the denoising loop against the FLOP-ideal one, the
fidelity of the cached images to the uncached ones (PSNR) and the share of each set the bundled
classifier reads as the requested digit; a PNG puts both grids side by side. The model is the
digits U-Net (``"digits"``, cut at a skip ``branch``) or the digits transformer
(``"digits-dit"``, cut at a block range: the ``first`` and ``last`` blocks run every step).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

import dcfx
from dcfx.branches import ideal_speedup_of_counts
from dcfx.digits import DEMO_PER_CLASS, IMAGE_SIZE, NUM_CLASSES, load_classifier
from dcfx.quality import accuracy, psnr

DEMO_MODELS = ("digits", "digits-dit")


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
    cut: str = "branch 0"

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


@dataclass(frozen=True)
class DemoModel:
    """A bundled model as the demo runs it: the denoiser, its sampling loop and its cut."""

    denoiser: nn.Module
    scheduler: Any
    draw: Callable[..., torch.Tensor]  # draw(denoiser, labels, steps=, guidance=, seed=) -> images
    cut: dict[str, int]  # DeepCacheConfig fields: {"branch": b} or {"first": f, "last": b}
    flop_share: float

    @property
    def cut_name(self) -> str:
        """How the output names the cut: ``branch 0`` or ``first 2, last 1``."""
        return ", ".join(f"{k} {v}" for k, v in self.cut.items())


def demo_model(
    model: str, batch: int, *, branch: int | None = None, first: int | None = None, last: int | None = None
) -> DemoModel:
    """Returns the bundled ``model`` ("digits" or "digits-dit") ready for the demo's cut at ``batch`` rows.

    The U-Net takes ``branch`` (default 0), the transformer ``first`` and ``last`` (default
    ``dcfx.digits_dit.DEMO_CUT``); the other kind's fields raise ValueError, as does a cut the model does not have.
    """
    shape = (batch, 1, IMAGE_SIZE, IMAGE_SIZE)
    if model == "digits":
        from dcfx.digits import generate, load_model

        if first is not None or last is not None:
            raise ValueError("the digits U-Net is cut at a skip branch (branch=), not first=/last= (digits-dit's)")
        branch = 0 if branch is None else branch
        digits = load_model()
        infos = dcfx.branches(digits.unet, shape)
        if not 0 <= branch < len(infos):
            raise ValueError(f"branch {branch} is out of range for the digits model; valid: 0..{len(infos) - 1}")

        def draw_unet(unet: nn.Module, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return generate(unet, digits.tokens, scheduler, labels, **kwargs)

        scheduler = digits.scheduler()
        return DemoModel(digits.unet, scheduler, draw_unet, {"branch": branch}, infos[branch].flop_share)
    if model == "digits-dit":
        from dcfx.digits_dit import DEMO_CUT, generate, load_model

        if branch is not None:
            raise ValueError("the digits transformer is cut at a block range (first=, last=), not a U-Net branch=")
        cut = {"first": DEMO_CUT[0] if first is None else first, "last": DEMO_CUT[1] if last is None else last}
        dit = load_model()
        infos = {(i.first, i.last): i for i in dcfx.branches(dit.transformer, shape)}
        if (cut["first"], cut["last"]) not in infos:
            n = len(dit.transformer.transformer_blocks)
            raise ValueError(
                f"first={cut['first']}, last={cut['last']} is out of range for digits-dit ({n} blocks); valid: "
                f"first, last >= 0 with first + last <= {n - 1}"
            )

        def draw_dit(transformer: nn.Module, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return generate(transformer, scheduler, labels, **kwargs)

        scheduler = dit.scheduler()
        return DemoModel(dit.transformer, scheduler, draw_dit, cut, infos[cut["first"], cut["last"]].flop_share)
    raise ValueError(f"unknown demo model {model!r}; valid: {', '.join(DEMO_MODELS)}")


def run_demo(
    *,
    model: str = "digits",
    branch: int | None = None,
    first: int | None = None,
    last: int | None = None,
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
    """Returns the demo's measurements after writing the side-by-side grid to ``out``.

    ``model`` is "digits" (the U-Net, cut at ``branch``) or "digits-dit" (the transformer, cut
    at ``first``/``last``); see ``demo_model``.
    """
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    batch = len(labels) * (2 if guidance > 1 else 1)
    subject = demo_model(model, batch, branch=branch, first=first, last=last)
    classifier, _, _ = load_classifier()
    scheduler = subject.scheduler
    fast = dcfx.compile(subject.denoiser, **subject.cut, interval=interval, backend=backend, scheduler=scheduler)

    def run(denoiser: nn.Module, n_steps: int = steps) -> torch.Tensor:
        return subject.draw(denoiser, labels, steps=n_steps, guidance=guidance, seed=seed)

    log(f"building dcfx graphs (capture, cut at {subject.cut_name}, {backend} backend) ...")
    start = time.perf_counter()
    run(fast, 2)
    build_s = time.perf_counter() - start
    log(f"timing {repeats} generations each of {len(labels)} digits, {steps} DDIM steps ...")
    base_s, base = _median_time(lambda: run(subject.denoiser), repeats)
    fast.stats.update(full=0, shallow=0)
    cached_s, cached = _median_time(lambda: run(fast), repeats)
    with torch.no_grad():
        acc_base = accuracy(classifier(base), labels)
        acc_cached = accuracy(classifier(cached), labels)
    title = f"dcfx {backend}, {subject.cut_name}, 1:{interval}: {base_s / cached_s:.2f}x"
    save_grid([("no cache", base), (title, cached)], NUM_CLASSES, out)
    return DemoResult(
        base_s=base_s,
        cached_s=cached_s,
        build_s=build_s,
        full_steps=fast.stats["full"] // repeats,
        shallow_steps=fast.stats["shallow"] // repeats,
        flop_share=subject.flop_share,
        psnr_db=psnr(cached, base).mean().item(),
        accuracy_base=acc_base,
        accuracy_cached=acc_cached,
        cut=subject.cut_name,
    )
