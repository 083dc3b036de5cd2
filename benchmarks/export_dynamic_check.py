"""One dynamic ONNX export, many sizes: onnxruntime against the eager runtime at each.

Exports a built-in U-Net once over ranges of batch, height and width, then runs a full and a
shallow step at every requested size with ``dcfx.load`` and with ``dcfx.compile`` (eager), and
reports the largest difference (per-call times: export_formats.py; here the eager runtime
captures each new size on its first call).

Usage:
    python benchmarks/export_dynamic_check.py --model sd15 --sizes 1x32x32,4x48x40,2x64x64
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from graph_speed import log, machine_info

import dcfx
from dcfx.models import spec_for
from dcfx.zoo import build_unet


def main(argv: list[str] | None = None) -> None:
    """Runs the check; writes JSON to benchmarks/results/export_dynamic/ and prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--batch", default="1:2:4", help="MIN:OPT:MAX")
    parser.add_argument("--latent", default="32:32:64", help="MIN:OPT:MAX for height and width")
    parser.add_argument("--sizes", default="1x32x32,4x48x40,2x64x64", help="BxHxW,... to check")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_dynamic")
    args = parser.parse_args(argv)
    batch = tuple(int(v) for v in args.batch.split(":"))
    latent = tuple(int(v) for v in args.latent.split(":"))
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    unet = build_unet(args.model)
    root = Path(tempfile.mkdtemp(prefix="dcfx-dynamic-"))
    try:
        start = time.perf_counter()
        out = dcfx.export(
            unet, root / "onnx", branch=args.branch, shapes={"batch": batch, "height": latent, "width": latent}
        )
        export_s = time.perf_counter() - start
        loaded = dcfx.load(out)
        eager = dcfx.compile(unet, branch=args.branch, interval=2)
        spec = spec_for(unet)
        rows = []
        for b, h, w in sizes:
            call = spec.example_call(unet, (b, unet.config.in_channels, h, w), torch.float32, torch.device("cpu"))
            row = {"size": [b, h, w]}
            for step, t in (("full", 900), ("shallow", 800)):
                call["timestep"] = torch.tensor(float(t))
                got, want = loaded(**call).sample, eager(**call).sample
                row[f"{step}_max_abs_diff"] = (got - want).abs().max().item()
            rows.append(row)
            log(f"{b}x{h}x{w}: {row}")
        assert loaded.stats == eager.stats == {"full": len(sizes), "shallow": len(sizes)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args) | {"out": str(args.out)},
        "machine": machine_info(),
        "export_s": export_s,
        "rows": rows,
    }
    (args.out / f"{args.model}_b{args.branch}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"dynamic ONNX export of {args.model}, branch {args.branch}: {export_s:.0f} s; batch {batch}, latents {latent}"
    )
    print("| batch x height x width | full step max diff | shallow step max diff |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['size']))} | {r['full_max_abs_diff']:.1e} | {r['shallow_max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
