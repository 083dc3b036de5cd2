"""dcfx's block-range cut against cache-dit 1.5.3's DBCache: the equality table.

For each tiny transformer pipeline (tests/transformers/tiny.py: SD3, Flux, PixArt, DiT, Sana,
Wan), each (F, B, schedule) and guidance on and off: cache-dit with
``DBCacheConfig(Fn_compute_blocks=F, Bn_compute_blocks=B, steps_computation_mask=M,
steps_computation_policy="static")``, then dcfx (eager, fp32) with ``first=F, last=B`` and the
schedule whose full steps are M's, on the same pipeline object, two seeds. Reported: the largest
difference of the latents relative to cache-dit's largest magnitude, and, as a control, how far
caching moved the result from the plain pipeline.

Usage:
    python benchmarks/dbcache_equality.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

STEPS = 8
CASES = (
    (1, 1, {"interval": 3}),
    (2, 0, {"interval": 2}),
    (1, 2, {"schedule": "explicit", "full_steps": (0, 1, 4, 6)}),
    (3, 0, {"interval": 4}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/transformers/dbcache_equality.md")
    args = parser.parse_args(argv)
    import cache_dit
    import torch

    import dcfx
    from dcfx.schedule import full_step_indices
    from tests.transformers.tiny import BUILDERS, MODELS

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    lines = [
        f"dcfx against cache-dit {cache_dit.__version__ if hasattr(cache_dit, '__version__') else '1.5.3'} "
        f"(fp32, eager, {STEPS} steps, seeds 0 and 5; same pipeline object, cache-dit first)",
        "",
        "| model | guidance | F | B | schedule (full steps) | max rel. diff to cache-dit | cache vs plain |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for name in MODELS:
        tiny = BUILDERS[name]()
        tiny.pipe.set_progress_bar_config(disable=True)
        guidances = [tiny.call["guidance_scale"]] + ([] if name == "flux" else [1.0])
        for guidance in guidances:
            tiny.call = dict(tiny.call, guidance_scale=guidance)
            separate = tiny.calls_per_step > 1
            for first, last, fields in CASES:
                full = full_step_indices(dcfx.DeepCacheConfig(first=1, **fields), STEPS)
                mask = [int(i in full) for i in range(STEPS)]
                config = tiny.cache_dit_config(first, last, mask)
                cache_dit.enable_cache(tiny.pipe, cache_config=config)
                want = [tiny.generate(STEPS, seed=s) for s in (0, 5)]
                cache_dit.disable_cache(tiny.pipe)
                plain = tiny.generate(STEPS, seed=0)
                dcfx.enable(tiny.pipe, first=first, last=last, **fields)
                got = [tiny.generate(STEPS, seed=s) for s in (0, 5)]
                dcfx.disable(tiny.pipe)
                diff = max(rel(g, w) for g, w in zip(got, want, strict=True))
                lines.append(
                    f"| {name} | {guidance:g}{' (two calls a step)' if separate else ''} | {first} | {last} | "
                    f"{full} | {diff:.1e} | {rel(want[0], plain):.1e} |"
                )
                print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
