"""TensorRT engine plans: profiles, engine builds and ``trtexec`` commands, in plain Python.

What the ``tensorrt`` format builds and what every ONNX export writes to ``trtexec.sh`` (the
same builds as command lines). Nothing here imports TensorRT, so it runs anywhere.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dcfx.export.manifest import GraphEntry
from dcfx.export.shapes import DimRange, TensorSpec

PRECISIONS = ("fp16", "fp32")
TIMING_CACHE = "timing.cache"
DEFAULT_WORKSPACE = 8 << 30

Shape = tuple[int, ...]


def profile_shapes(inputs: Sequence[TensorSpec], dims: Mapping[str, DimRange]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Returns the (min, opt, max) shape of each graph input of rank 1 or more over the dimension ranges.

    A 0-d input (the forecast coefficient) has its one shape: TensorRT wants no profile for
    it, and trtexec has no way to write an empty shape.
    """
    points = [{name: getattr(dim, key) for name, dim in dims.items()} for key in ("min", "opt", "max")]
    profile = {}
    for spec in inputs:
        if not spec.shape:
            continue
        lo, opt, hi = (spec.size(values) for values in points)
        profile[spec.graph_name] = (lo, opt, hi)
    return profile


@dataclass(frozen=True)
class EngineBuild:
    """One engine to build: the ONNX file, the engine file, the precision and the profile."""

    onnx: str
    engine: str
    precision: str
    profile: dict[str, tuple[Shape, Shape, Shape]]
    workspace: int = DEFAULT_WORKSPACE
    timing_cache: str = TIMING_CACHE

    def trtexec(self) -> str:
        """Returns the equivalent ``trtexec`` command line."""
        shapes = {
            key: ",".join(f"{name}:{'x'.join(map(str, shape[i]))}" for name, shape in self.profile.items())
            for i, key in enumerate(("minShapes", "optShapes", "maxShapes"))
        }
        args = [
            "trtexec",
            f"--onnx={self.onnx}",
            f"--saveEngine={self.engine}",
            *(f"--{key}={value}" for key, value in shapes.items()),
            f"--memPoolSize=workspace:{self.workspace >> 20}M",
            f"--timingCacheFile={self.timing_cache}",
        ]
        args.append("--fp16" if self.precision == "fp16" else "--noTF32")
        return " ".join(shlex.quote(a) for a in args)


def build_plan(
    entries: Mapping[str, GraphEntry],
    dims: Mapping[str, DimRange],
    precision: str = "fp16",
    workspace: int = DEFAULT_WORKSPACE,
) -> dict[str, EngineBuild]:
    """Returns the engine builds of an ONNX export (graph name -> ``EngineBuild``).

    Raises:
        ValueError: for an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return {
        graph: EngineBuild(
            onnx=entry.file,
            engine=f"{graph}.plan",
            precision=precision,
            profile=profile_shapes(entry.inputs, dims),
            workspace=workspace,
        )
        for graph, entry in entries.items()
    }


def trtexec_script(entries: Mapping[str, GraphEntry], dims: Mapping[str, DimRange]) -> str:
    """Returns a shell script with the ``trtexec`` builds of every engine (fp16 and fp32)."""
    lines = [
        "#!/bin/sh",
        "# TensorRT engines for this dcfx export, built by hand (run in this directory).",
        "# The profiles cover the export's ranges: " + ", ".join(f"{d.name} {d.describe()}" for d in dims.values()),
        "# fp16 (use these, or the fp32 ones below):",
    ]
    for precision in PRECISIONS:
        if precision == "fp32":
            lines.append("# fp32:")
        for build in build_plan(entries, dims, precision).values():
            line = build.trtexec()
            lines.append(line if precision == "fp16" else "# " + line)
    return "\n".join(lines) + "\n"
