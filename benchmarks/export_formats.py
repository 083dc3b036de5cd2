"""Deployment formats on the CPU: export time, artifact size, per-call full and shallow times.

For each format (ONNX + onnxruntime, AOTInductor .pt2) the U-Net is exported with
``dcfx.export``, loaded back, and its full and shallow graphs are timed in the same
round-robin rounds as the eager graphs (see graph_speed.py: a drift of the machine's speed
hits every graph alike). Reported: export seconds, bytes per file, per-call medians, the
shallow/full time ratio against the FLOP share r, and the largest difference to eager.

Usage:
    python benchmarks/export_formats.py --model small-sd --repeats 3      # a minute or two
    python benchmarks/export_formats.py                                   # sd15, 32x32, batch 2 (~20 min)
    python benchmarks/export_formats.py --dynamic                         # also a dynamic ONNX export
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from graph_speed import Scenario, log, machine_info, time_graphs

import dcfx
from dcfx.branches import count_flops
from dcfx.export.manifest import read_manifest
from dcfx.export.registry import get_format
from dcfx.models import spec_for
from dcfx.passes import build_graph_pair
from dcfx.zoo import build_unet

FORMATS = ("onnx", "aoti")


def export_and_load(unet: torch.nn.Module, fmt: str, branch: int, shapes: dict, root: Path) -> dict[str, Any]:
    """Exports ``unet`` in ``fmt``; returns the timing, the sizes and the loaded pair."""
    out = root / fmt
    start = time.perf_counter()
    dcfx.export(unet, out, branch=branch, format=fmt, shapes=shapes)
    export_s = time.perf_counter() - start
    manifest = read_manifest(out)
    pair = get_format(fmt).load(out, manifest)
    log(f"{fmt}: exported in {export_s:.1f} s, {sum(f['bytes'] for f in manifest.files.values()) / 1e6:.1f} MB")
    return {
        "export_s": export_s,
        "files": {name: info["bytes"] for name, info in manifest.files.items()},
        "format_data": manifest.format_data,
        "checks": manifest.checks,
        "pair": pair,
    }


def measure(scenario: Scenario, formats: tuple[str, ...], dynamic: bool, root: Path) -> dict[str, Any]:
    """Returns every format's export facts and the per-call times of all graphs."""
    unet = build_unet(scenario.model, seed=scenario.seed)
    spec = spec_for(unet)
    branch = scenario.branches[0]
    shape = (scenario.batch, unet.config.in_channels, scenario.size, scenario.size)
    torch.manual_seed(scenario.seed)
    (names, tensors), _ = spec.flatten(unet, (), spec.example_call(unet, shape, torch.float32, torch.device("cpu")))
    static = {"batch": scenario.batch, "height": scenario.size, "width": scenario.size}
    exports = {fmt: export_and_load(unet, fmt, branch, static, root) for fmt in formats}
    if dynamic:
        log("onnx: dynamic export (batch 1..4, 32..64 latents), export time and size only")
        ranges = {"batch": (1, scenario.batch, 4), "height": (32, scenario.size, 64), "width": (32, scenario.size, 64)}
        facts = export_and_load(unet, "onnx", branch, ranges, root / "dynamic")
        facts.pop("pair")
        exports["onnx dynamic"] = facts
    pair = build_graph_pair(unet, branch, names, tensors)
    with torch.no_grad():
        sample, feature = pair.full(*tensors)
    r = count_flops(pair.shallow, *tensors, feature) / count_flops(pair.full, *tensors)
    graphs = {"eager full": (pair.full, tensors), "eager shallow": (pair.shallow, (*tensors, feature))}
    for fmt in formats:
        loaded = exports[fmt]["pair"]
        graphs[f"{fmt} full"] = (loaded.full, tensors)
        graphs[f"{fmt} shallow"] = (loaded.shallow, (*tensors, feature))
    timings, outputs = time_graphs(graphs, scenario)
    rows = []
    for runner in ("eager", *formats):
        full, shallow = timings[f"{runner} full"], timings[f"{runner} shallow"]
        ratio = shallow.median_s / full.median_s
        rows.append(
            {
                "runner": runner,
                "full_median_s": full.median_s,
                "shallow_median_s": shallow.median_s,
                "full_vs_eager": timings["eager full"].median_s / full.median_s,
                "shallow_vs_eager": timings["eager shallow"].median_s / shallow.median_s,
                "ratio": ratio,
                "r": r,
                "ratio_over_r": ratio / r,
                "full_max_abs_err": (outputs[f"{runner} full"][0] - sample).abs().max().item(),
                "shallow_max_abs_err": (outputs[f"{runner} shallow"] - sample).abs().max().item(),
                "full_times_s": list(full.times_s),
                "shallow_times_s": list(shallow.times_s),
            }
        )
    for facts in exports.values():
        facts.pop("pair", None)
    return {"branch": branch, "r": r, "exports": exports, "rows": rows}


def markdown(scenario: Scenario, result: dict[str, Any]) -> str:
    """Returns the result as two markdown tables (exports, per-call times)."""
    lines = [
        f"# Deployment formats: {scenario.model}, latents {scenario.size}x{scenario.size}, batch {scenario.batch}, "
        f"branch {result['branch']} (r = {result['r']:.3f}), CPU fp32",
        "",
        "| export | time (s) | files (MB) | shallow weights stored again (MB) |",
        "|---|---|---|---|",
    ]
    for name, facts in result["exports"].items():
        files = ", ".join(f"{f} {b / 1e6:.1f}" for f, b in facts["files"].items() if b > 1e5)
        weights = facts["format_data"].get("weights", {})
        again = f"{weights['shallow_new_bytes'] / 1e6:.2f}" if weights else "n/a (each .pt2 holds its weights)"
        lines.append(f"| {name} | {facts['export_s']:.1f} | {files} | {again} |")
    lines += [
        "",
        f"Per call, median of {scenario.repeats} round-robin rounds:",
        "",
        "| runner | full (s) | shallow (s) | full vs eager | shallow vs eager | shallow/full | r | ratio/r | max err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['runner']} | {row['full_median_s']:.3f} | {row['shallow_median_s']:.4f} | "
            f"{row['full_vs_eager']:.2f}x | {row['shallow_vs_eager']:.2f}x | {row['ratio']:.3f} | {row['r']:.3f} | "
            f"{row['ratio_over_r']:.2f} | {max(row['full_max_abs_err'], row['shallow_max_abs_err']):.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(scenario: Scenario, result: dict[str, Any], path: Path) -> None:
    """Bars of the per-call full and shallow medians per runner; the ratio over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["full_median_s"] for r in rows], 0.4, label="full graph")
    ax.bar([i + 0.2 for i in x], [r["shallow_median_s"] for r in rows], 0.4, label="shallow graph")
    for i, row in zip(x, rows, strict=True):
        ax.text(i, row["full_median_s"] * 1.02, f"shallow/full {row['ratio']:.3f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [r["runner"] for r in rows])
    ax.set_ylabel("seconds per call (median)")
    ax.set_title(
        f"{scenario.model} {scenario.size}x{scenario.size} b{scenario.batch}, branch {result['branch']}: "
        f"r = {result['r']:.3f}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and writes JSON, markdown and PNG to benchmarks/results/export_formats/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dynamic", action="store_true", help="also time a dynamic-shape ONNX export")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_formats")
    args = parser.parse_args(argv)
    scenario = Scenario(
        model=args.model, size=args.size, batch=args.batch, branches=(args.branch,), repeats=args.repeats, warmup=1
    )
    formats = tuple(f for f in args.formats.split(",") if f)
    root = Path(tempfile.mkdtemp(prefix="dcfx-export-bench-"))
    try:
        result = measure(scenario, formats, args.dynamic, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{scenario.model}_latent{scenario.size}_batch{scenario.batch}_b{args.branch}"
    payload = {"scenario": vars(args) | {"out": str(args.out)}, "machine": machine_info(), **result}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    table = markdown(scenario, result)
    (args.out / f"{stem}.md").write_text(table)
    plot(scenario, result, args.out / f"{stem}.png")
    print(table)
    print(f"written to {args.out}/{stem}.{{json,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
