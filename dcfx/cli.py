"""The ``dcfx`` command: ``demo``, ``branches``, ``tune``, ``export``, ``inspect``, ``serve``.

Commands that cut a model take ``--branch`` (a U-Net's skip branch) or ``--first``/``--last``
(a diffusion transformer's block range); ``--model`` is a name or a diffusers folder (a
pipeline folder's ``unet/`` or ``transformer/``, or the model's own folder).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dcfx import zoo
from dcfx.branches import BlockRangeInfo, branches, format_branches
from dcfx.digits import DEMO_PER_CLASS
from dcfx.digits_dit import DEMO_CUT
from dcfx.forecast import available_forecasts
from dcfx.models import spec_for

MODEL_HELP = (
    f"{zoo.BUNDLED} (bundled, trained), a built-in config ({', '.join(zoo.CONFIGS)}), or a diffusers folder "
    "(a U-Net or a diffusion transformer)"
)


def load_unet(model: str) -> nn.Module:
    """Returns the denoiser of ``--model`` (a U-Net, or a pipeline folder's transformer); a bad name exits."""
    try:
        return zoo.load_unet(model)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"dcfx: --model: {e}") from e


def cut_fields(command: str, branch: int | None, first: int | None, last: int | None) -> dict[str, int]:
    """Returns the DeepCacheConfig fields of ``--branch`` or ``--first``/``--last``; exits when both are given."""
    if branch is not None and (first is not None or last is not None):
        raise SystemExit(
            f"dcfx {command}: --branch and --first/--last given together: --branch cuts a U-Net at a skip branch, "
            "--first/--last cut a diffusion transformer at a block range; give one or the other"
        )
    named = {"branch": branch, "first": first, "last": last}
    return {k: v for k, v in named.items() if v is not None}


def add_cut_arguments(p: argparse.ArgumentParser) -> None:
    """Adds ``--branch``, ``--first`` and ``--last`` (default: branch 0 of a U-Net, first 1 last 0 of a transformer)."""
    p.add_argument("--branch", type=int, help="U-Nets: the skip branch to cache (default 0)")
    p.add_argument("--first", type=int, help="diffusion transformers: blocks run first on every step (default 1)")
    p.add_argument("--last", type=int, help="diffusion transformers: blocks run last on every step (default 0)")


def check_model(model: str) -> None:
    """Exits with the message of ``dcfx.zoo.check_model`` unless ``--model`` names a model."""
    try:
        zoo.check_model(model)
    except ValueError as e:
        raise SystemExit(f"dcfx: --model: {e}") from e


def cmd_branches(args: argparse.Namespace) -> int:
    """Prints every branch of a U-Net (every block range of a transformer) with its FLOP share and ideal speedups."""
    unet = load_unet(args.model)
    shape = spec_for(unet).sample_shape(unet, args.batch, args.size, args.size)
    print(f"dcfx branches: {args.model}, sample {list(shape)}", file=sys.stderr)
    infos = branches(unet, shape)
    print(format_branches(infos))
    if args.layers:
        for info in infos:
            if isinstance(info, BlockRangeInfo):
                print(f"first {info.first} last {info.last}: cached {', '.join(info.cached)}")
            else:
                print(f"branch {info.branch}: {', '.join(info.kept_layers)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generates digits with the bundled model without and with DeepCache; prints speed and quality."""
    from dcfx.demo import run_demo

    res = run_demo(
        model=args.model,
        branch=args.branch,
        first=args.first,
        last=args.last,
        interval=args.interval,
        steps=args.steps,
        per_class=args.per_class,
        guidance=args.guidance,
        repeats=args.repeats,
        backend=args.backend,
        out=args.out,
        seed=args.seed,
    )
    digits = args.per_class * 10
    print(f"bundled {args.model} model, {digits} digits, {args.steps} DDIM steps, guidance {args.guidance}")
    print(f"dcfx {args.backend}, {res.cut}, 1:{args.interval} uniform")
    print(f"  graphs built in {res.build_s:.1f} s (capture, cut, {args.backend}); not in the times below")
    print(f"  denoising loop: no cache {res.base_s:.2f} s, dcfx {res.cached_s:.2f} s (median of {args.repeats})")
    print(
        f"  speedup {res.speedup:.2f}x; FLOP-ideal {res.ideal:.2f}x ({res.full_steps} full + {res.shallow_steps} "
        f"shallow steps, r = {res.flop_share:.3f}); measured/ideal {res.speedup / res.ideal:.2f}"
    )
    print(f"  fidelity to no cache: PSNR {res.psnr_db:.1f} dB (mean over images)")
    print(
        f"  classifier accuracy on the requested digit: no cache {res.accuracy_base:.1%}, "
        f"dcfx {res.accuracy_cached:.1%}"
    )
    print(f"  grids side by side: {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Measures DeepCache configurations on this machine; prints the frontier and the choice for the goal."""
    from dcfx.tune import TuneSettingsError, tune

    check_model(args.model)  # before the sweep's other checks load anything
    try:
        result = _tune(args, tune)
    except TuneSettingsError as e:
        print(f"dcfx tune: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/{', '.join(result.written)}")
    return 0 if result.goal is None or result.chosen is not None else 1


def _tune(args: argparse.Namespace, tune: Any) -> Any:
    return tune(
        args.model,
        scheduler=args.scheduler,
        steps=args.steps,
        batch=args.batch,
        size=args.size,
        backend=args.backend,
        seeds=args.seeds,
        latency=args.latency,
        speedup=args.speedup,
        quality=args.quality,
        branches=_ints(args.branches) if args.branches else None,
        first=_ints(args.first) if args.first else None,
        last=_ints(args.last) if args.last else None,
        intervals=_ints(args.intervals),
        schedules=tuple(args.schedules.split(",")),
        forecasts=tuple(args.forecasts.split(",")),
        step_counts=_ints(args.step_counts) if args.step_counts else None,
        min_speedup=args.min_speedup,
        repeats=args.repeats,
        max_rounds=args.max_rounds,
        tolerance=args.tolerance,
        out=args.out,
        cache=not args.no_cache,
        verify=not args.no_verify,
        log=lambda m: print(m, file=sys.stderr),
    )


def _ints(text: str) -> tuple[int, ...]:
    """Parses ``0,2,5`` or ``2-10`` (inclusive) into ints."""
    values: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            values.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ints like 0,2,5 or 2-10, got {text!r}") from None
    return tuple(values)


def _range(text: str) -> int | tuple[int, ...]:
    """Parses ``64`` (static) or ``32:128`` / ``32:64:128`` (min:max, min:opt:max)."""
    try:
        parts = tuple(int(p) for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, MIN:MAX or MIN:OPT:MAX, got {text!r}") from None
    if len(parts) not in (1, 2, 3):
        raise argparse.ArgumentTypeError(f"expected N, MIN:MAX or MIN:OPT:MAX, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def cmd_export(args: argparse.Namespace) -> int:
    """Exports a U-Net's graph pair in a deployment format."""
    import dcfx

    unet = load_unet(args.model)
    given = {name: getattr(args, name) for name in ("batch", "height", "width", "tokens", "frames")}
    shapes = {**zoo.typical_shapes(args.model), **{k: v for k, v in given.items() if v is not None}}
    options = {k: v for k, v in (("opset", args.opset), ("precision", args.precision)) if v is not None}
    config = args.config or None
    cut = cut_fields("export", args.branch, args.first, args.last)
    fields = {} if config else {**cut, "interval": args.interval}
    out = dcfx.export(
        unet,
        args.out,
        config,
        format=args.format,
        shapes=shapes,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
        **fields,
        **options,
    )
    _print_summary(out)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Verifies an export directory against its manifest and prints what it holds."""
    from dcfx.export.manifest import ArtifactError

    try:
        _print_summary(args.dir)
    except ArtifactError as e:
        print(f"dcfx inspect: {e}", file=sys.stderr)
        return 1
    return 0


def _print_summary(directory: str | os.PathLike[str]) -> None:
    from dcfx.export.manifest import read_manifest

    m = read_manifest(directory)
    print(f"{directory}: {m.format} export of {m.model['class']} (format version {m.format_version}), all sha256 ok")
    print(f"  deepcache: {m.deepcache}")
    print("  dims: " + ", ".join(f"{d.name} {d.describe()}" for d in m.dims.values()) + f"; dtype {m.dtype}")
    for name, entry in m.graphs.items():
        shapes = ", ".join(f"{s.name}{list(s.shape)}" for s in entry.inputs)
        print(f"  {name}: {entry.file} ({m.files[entry.file]['bytes'] / 1e6:.1f} MB) takes {shapes}")
    total = sum(f["bytes"] for f in m.files.values())
    print(f"  files: {len(m.files)}, {total / 1e6:.1f} MB in all; checks: {m.checks}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serves a model over HTTP on Ray Serve until Ctrl-C or SIGTERM; then drains and stops."""
    import signal
    import threading

    cut = cut_fields("serve", args.branch, args.first, args.last)
    try:
        from dcfx.serve.app import ServeApp, ServeOptions
    except ImportError as e:
        raise SystemExit(f"dcfx serve needs Ray Serve: pip install 'dcfx[serve]' ({e})") from None
    try:
        options = ServeOptions(
            model=args.model,
            replicas=args.replicas,
            max_batch=args.max_batch,
            batch_sizes=_ints(args.batch_sizes) if args.batch_sizes else None,
            max_wait=args.max_wait,
            max_queue=args.max_queue,
            **cut,
            interval=_ints(args.interval),
            forecast=tuple(args.forecast.split(",")),
            backend=args.backend,
            threads=args.threads,
            retries=args.retries,
            request_timeout_s=args.request_timeout,
        )
    except (ValueError, TypeError) as e:  # a bad --interval, --forecast or batching flag
        raise SystemExit(f"dcfx serve: {e}") from None
    app = ServeApp(options, host=args.host, port=args.port, address=args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    where = f"the Ray cluster at {args.address}" if args.address else "a local Ray instance"
    print(f"dcfx serve: starting {args.model} x {args.replicas} on {where} ...", file=sys.stderr, flush=True)
    url = app.start()
    routes = "POST /v1/images/generations, POST /generate, GET /health, GET /stats"
    print(f"dcfx serve: ready at {url} ({routes}); Ctrl-C stops", flush=True)
    stop.wait()
    print(f"dcfx serve: draining (up to {args.drain_timeout:g} s), then stopping ...", file=sys.stderr, flush=True)
    unfinished = app.stop(drain_timeout_s=args.drain_timeout)
    print(f"dcfx serve: stopped ({unfinished} requests unfinished)", file=sys.stderr, flush=True)
    return 0 if unfinished == 0 else 1


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the ``serve`` subcommand to the ``dcfx`` parser."""
    p = sub.add_parser("serve", help="serve a model over HTTP on Ray Serve, with DeepCache-aware step batching")
    p.add_argument(
        "--model",
        default="digits",
        help="digits (bundled), a diffusers pipeline folder (served by prompt: POST /v1/images/generations, "
        "for the pipelines dcfx serves by prompt) or a model folder (a U-Net or transformer: tensors in)",
    )
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (Ray Serve deployment replicas)")
    p.add_argument("--max-batch", type=int, default=16, help="U-Net rows per call at most")
    p.add_argument("--batch-sizes", help="batch sizes calls are padded to, e.g. 1,2,4,8,16 (default: powers of two)")
    p.add_argument("--max-wait", type=int, help="ticks a request may wait for phase alignment (default: always)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests per replica; more get a 503")
    add_cut_arguments(p)
    p.add_argument(
        "--interval",
        default="5",
        help='N of the 1:N schedule; several (3,5) let each request choose ("interval"), the first is the default',
    )
    p.add_argument(
        "--forecast",
        default="none",
        help=f"what shallow steps read: {', '.join(available_forecasts())} (none: the paper's reuse; linear: a "
        "forecast from the last two full steps); several (none,linear) let each request choose, the first is the "
        "default",
    )
    p.add_argument("--backend", default="eager", help="a registered backend: eager or inductor")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: cores / replicas)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="join this Ray cluster instead of starting a local Ray instance")
    p.add_argument("--retries", type=int, default=2, help="times a request is sent again when its replica died")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request gets a 504")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds in-flight requests get at shutdown")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``dcfx`` command."""
    parser = argparse.ArgumentParser(prog="dcfx", description="DeepCache for diffusion U-Nets as a compiler pass")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "branches",
        help="list every skip branch (a transformer: every first/last block range): FLOP share r, ideal speedups",
    )
    p.add_argument("--model", default="sd15", help=MODEL_HELP)
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", action="store_true", help="also list the layers each shallow graph runs")
    p.set_defaults(func=cmd_branches)

    p = sub.add_parser("demo", help="a bundled digits model without and with DeepCache: speedup, quality, a PNG")
    p.add_argument("--model", default="digits", choices=["digits", "digits-dit"], help="the U-Net or the transformer")
    p.add_argument("--branch", type=int, help="digits: the skip branch to cache (default 0)")
    p.add_argument("--first", type=int, help=f"digits-dit: blocks run first on every step (default {DEMO_CUT[0]})")
    p.add_argument("--last", type=int, help=f"digits-dit: blocks run last on every step (default {DEMO_CUT[1]})")
    p.add_argument("--interval", type=int, default=5, choices=range(1, 51), metavar="N")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--per-class", type=int, default=DEMO_PER_CLASS, help="digits generated per class (10 classes)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations each way (the median is reported)")
    p.add_argument("--backend", default="eager", help="a registered backend: eager or inductor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dcfx_demo.png", help="where to write the side-by-side grids")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write the full and shallow graphs as ONNX, TensorRT engines or AOTInductor")
    p.add_argument("out", help="the export directory (appears only when complete)")
    p.add_argument("--model", default="small-sd", help=MODEL_HELP)
    p.add_argument("--format", default="onnx", choices=["onnx", "tensorrt", "aoti"])
    p.add_argument("--config", help="a DeepCacheConfig JSON file (instead of --branch or --first/--last, --interval)")
    add_cut_arguments(p)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument(
        "--batch",
        type=_range,
        help="batch size: N, MIN:MAX or MIN:OPT:MAX; default: 1:2:4 (1:40:63 for the digits model: its demo's "
        "40 digits; a larger batch, such as 80 rows with guidance, runs in chunks within the range)",
    )
    for dim in ("height", "width"):
        p.add_argument(f"--{dim}", type=_range, help=f"{dim} (latent): N, MIN:MAX or MIN:OPT:MAX")
    p.add_argument(
        "--tokens",
        type=_range,
        help="prompt length (the cross-attention states' second dimension): N, MIN:MAX or MIN:OPT:MAX; "
        "default: the model's own (77; 4 for the digits model)",
    )
    p.add_argument("--frames", type=_range, help="video transformers (Wan): latent frames, N, MIN:MAX or MIN:OPT:MAX")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--opset", type=int, help="ONNX opset (onnx, tensorrt)")
    p.add_argument("--precision", choices=["fp16", "fp32"], help="engine precision (tensorrt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tune", help="measure configurations on this machine: Pareto frontier, best for a goal")
    p.add_argument("--model", default="digits", help=MODEL_HELP)
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=["ddim", "dpm", "euler", "flow"],
        help="the sampler (flow: flow-matching Euler, for SD3 and Flux transformers)",
    )
    p.add_argument("--steps", type=int, default=50, help="steps of the no-cache reference (quality and speedup)")
    p.add_argument("--batch", type=int, default=10, help="samples per generation (the latency is measured at it)")
    p.add_argument("--size", type=int, help="latent height and width (default: the model's sample_size)")
    p.add_argument("--backend", default="eager")
    p.add_argument("--seeds", type=int, default=20, help="K calibration seeds (class labels or prompt embeddings)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--latency", type=float, help="goal: seconds per generation at most (best quality within)")
    goal.add_argument("--speedup", type=float, help="goal: speedup over no cache at least (best quality)")
    goal.add_argument("--quality", type=float, help="goal: PSNR dB against no cache at least (lowest latency)")
    p.add_argument("--branches", help="U-Nets: branch ids, e.g. 0,1,2 or 0-3 (default: all)")
    p.add_argument(
        "--first",
        help="diffusion transformers: values of first (blocks run first every step), e.g. 1,2,4 (default: 1,2,4,...)",
    )
    p.add_argument(
        "--last",
        help="diffusion transformers: values of last (blocks run last every step), e.g. 0-2 (default: 0,1,2,4,...); "
        "every first x last that leaves a block to cache is searched",
    )
    p.add_argument("--intervals", default="2-10", help="values of N, e.g. 2-10 or 2,3,5")
    p.add_argument("--schedules", default="uniform,non-uniform")
    p.add_argument(
        "--forecasts",
        default="none,linear",
        help="forecast modes, each a candidate with every branch x interval x schedule "
        f"(default: none,linear; registered: {', '.join(available_forecasts())}; none is the paper's reuse)",
    )
    p.add_argument(
        "--step-counts",
        help="step counts to sample with, e.g. 50,40,30 or 25-50, each at most --steps (default: --steps only); "
        "at fewer steps no cache is a candidate too, and quality is always against no cache at --steps",
    )
    p.add_argument("--min-speedup", type=float, default=1.1, help="prune candidates whose FLOP-ideal speedup is lower")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per candidate, at least")
    p.add_argument("--max-rounds", type=int, default=10, help="timed generations per candidate, at most")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.03,
        help="time candidates in interleaved rounds until each median latency's spread is within this (0.03: 3%%)",
    )
    p.add_argument("--out", default="tune_out", help="directory for config.json, report.md, pareto.png, results.json")
    p.add_argument("--no-cache", action="store_true", help="measure everything again (ignore out/cache.json)")
    p.add_argument("--no-verify", action="store_true", help="skip the fresh rerun of the chosen configuration")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("inspect", help="verify an export directory (sha256 of every file) and summarise it")
    p.add_argument("dir")
    p.set_defaults(func=cmd_inspect)

    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``dcfx`` command line."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
