"""``dcfx.tune``: the fastest DeepCache configuration that keeps quality, measured on this machine.

DeepCache has four knobs (branch, interval, schedule shape, caching window) whose best values
depend on the model, the sampler, the step count, the backend and the hardware. ``tune``
measures them instead of guessing:

1. The no-cache generation of K calibration seeds at the requested shape: the reference
   images and the baseline latency.
2. A cost model from the branches' FLOP shares r predicts each candidate's latency as
   T1 x (full + shallow r) / steps, T1 being a measured generation of full steps through
   dcfx's graphs. Candidates that cannot pay (FLOP-ideal speedup
   below ``min_speedup``) or cannot meet a latency or speedup goal even with a generous
   margin are pruned before anything runs; for a quality goal, candidates run fastest
   predicted first and the search stops once nothing left can beat the best found.
3. Each remaining candidate runs the K seeds: its latency (median generation time) and its
   quality (PSNR of its images against the no-cache ones, mean in dB). Measurements are
   cached on disk, keyed by the model, the weights, the workload and this machine.
4. The Pareto frontier (latency against quality) and the choice for the goal; the choice is
   checked by a fresh run from the written config file.

Example:
    >>> result = dcfx.tune("digits", steps=50, speedup=3.0, out="tune_out")
    >>> unet = dcfx.compile(unet, config="tune_out/config.json", scheduler=scheduler)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dcfx
from dcfx.branches import branches as list_branches
from dcfx.config import DeepCacheConfig
from dcfx.quality import psnr
from dcfx.schedule import full_step_indices

GOALS = ("latency", "speedup", "quality")
SCHEDULERS = ("ddim", "dpm", "euler")
# PSNR of identical images is infinite; reported and plotted at this ceiling.
PSNR_CAP = 100.0
# A prediction from FLOPs may be this far off the measured latency (shallow steps often run
# faster per FLOP than full ones on a CPU): pruning keeps anything within the margin.
MARGIN = 0.25


@dataclass(frozen=True)
class Goal:
    """What the tuner optimises: a latency budget (s per generation), a speedup, or a quality floor (PSNR dB)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in GOALS:
            raise ValueError(f"unknown goal {self.kind!r}; valid: {', '.join(GOALS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not self.value > 0:
            raise ValueError(f"the {self.kind} goal must be a number > 0, got {self.value!r}")
        if self.kind == "speedup" and self.value <= 1:
            raise ValueError(f"a speedup goal must be > 1 (1 is no cache), got {self.value}")

    def describe(self) -> str:
        """Returns the goal in words."""
        return {
            "latency": f"latency <= {self.value:g} s per generation, best quality",
            "speedup": f"speedup >= {self.value:g}x over no cache, best quality",
            "quality": f"PSNR >= {self.value:g} dB against no cache, lowest latency",
        }[self.kind]


@dataclass(frozen=True)
class Candidate:
    """One configuration the tuner considers, with what the cost model predicts for it."""

    config: DeepCacheConfig
    steps: int
    full_steps: int
    flop_share: float
    predicted_s: float

    @property
    def key(self) -> str:
        """The configuration as a stable string (the cache key within a workload)."""
        return json.dumps(self.config.to_dict(), sort_keys=True)

    @property
    def ideal_speedup(self) -> float:
        """The FLOP-ideal speedup of this configuration's steps: steps / (full + shallow r)."""
        return self.steps / (self.full_steps + (self.steps - self.full_steps) * self.flop_share)


@dataclass
class Measurement:
    """A measured configuration: its config, the prediction and what was measured."""

    config: dict[str, Any]
    full_steps: int
    flop_share: float
    predicted_s: float
    latency_s: float
    times_s: list[float]
    psnr_db: float
    cached: bool = False

    def speedup(self, baseline_s: float) -> float:
        """The measured speedup over the no-cache baseline."""
        return baseline_s / self.latency_s


@dataclass
class TuneResult:
    """What ``tune`` found: every measurement, the Pareto frontier, the choice and its check."""

    workload: dict[str, Any]
    goal: Goal | None
    baseline_s: float
    full_s: float
    measurements: list[Measurement]
    frontier: list[Measurement]
    chosen: Measurement | None
    check: dict[str, Any] | None
    counts: dict[str, int]
    wall_s: float
    out: Path | None = None
    machine: dict[str, Any] = field(default_factory=dict)


class Workload:
    """A model and the generations the tuner runs: inputs per calibration seed and a sampling loop."""

    name: str
    unet: nn.Module

    def scheduler(self) -> Any:
        """Returns a fresh scheduler of the requested kind."""
        raise NotImplementedError

    def inputs(self, seeds: Sequence[int], size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the initial noise and the conditioning of a batch, one sample per seed."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Returns what identifies the workload (for the cache key and the report)."""
        raise NotImplementedError


def _scheduler_class(name: str) -> Any:
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return classes[name]


class DigitsWorkload(Workload):
    """The bundled digits model; calibration seed s draws digit s % 10 from noise seeded with s."""

    def __init__(self, scheduler: str) -> None:
        from dcfx.digits import load_model

        self.name = "digits"
        self._scheduler_cls = _scheduler_class(scheduler)
        self._scheduler_name = scheduler
        self.model = load_model()
        self.unet = self.model.unet

    def scheduler(self) -> Any:  # noqa: D102
        return self._scheduler_cls.from_config(self.model.scheduler().config)

    def inputs(self, seeds: Sequence[int], size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: D102
        from dcfx.digits import NUM_CLASSES

        noise = torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        labels = torch.tensor([s % NUM_CLASSES for s in seeds])
        with torch.no_grad():
            return noise, {"encoder_hidden_states": self.model.tokens(labels)}

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {"model": "digits", "scheduler": self._scheduler_name}


class FolderWorkload(Workload):
    """A diffusers U-Net from a folder (or a built-in config); conditioning is seeded random embeddings.

    No text encoder is needed: each calibration seed draws its own prompt embeddings (77 tokens
    of the model's cross-attention width), so fidelity to no cache is measured on as many
    different conditions as seeds.
    """

    def __init__(self, model: str, scheduler: str) -> None:
        from dcfx.cli import load_unet

        self.name = model
        self.unet = load_unet(model)
        self._scheduler_cls = _scheduler_class(scheduler)
        self._scheduler_name = scheduler
        folder = Path(model) / "scheduler"
        self._scheduler_config = self._scheduler_cls.load_config(folder) if folder.is_dir() else None

    def scheduler(self) -> Any:  # noqa: D102
        if self._scheduler_config is not None:
            return self._scheduler_cls.from_config(self._scheduler_config)
        return self._scheduler_cls()

    def inputs(self, seeds: Sequence[int], size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: D102
        spec = dcfx.models.spec_for(self.unet)
        param = next(self.unet.parameters())
        calls = []
        for s in seeds:
            with torch.random.fork_rng():
                torch.manual_seed(s)
                calls.append(
                    spec.example_call(self.unet, spec.sample_shape(self.unet, 1, size, size), param.dtype, param.device)
                )
        noise = torch.cat([c.pop("sample") for c in calls])
        for c in calls:
            c.pop("timestep")
        cond = {k: torch.cat([c[k] for c in calls]) for k in calls[0] if isinstance(calls[0][k], torch.Tensor)}
        return noise, cond

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {"model": self.name, "scheduler": self._scheduler_name}


def load_workload(model: str, scheduler: str = "ddim") -> Workload:
    """Returns the workload of ``model``: "digits" (bundled), a built-in config name, or a diffusers folder."""
    if model == "digits":
        return DigitsWorkload(scheduler)
    return FolderWorkload(model, scheduler)


Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]  # initial noise, conditioning


@torch.no_grad()
def generate(
    unet: nn.Module, scheduler: Any, noise: torch.Tensor, cond: dict[str, torch.Tensor], steps: int
) -> torch.Tensor:
    """Returns the final sample of a sampling loop from ``noise`` (a dcfx runtime or the plain U-Net)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, **cond).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def measure(
    run: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor], batches: Sequence[Batch], repeats: int
) -> tuple[list[float], list[torch.Tensor]]:
    """Returns the times of at least ``repeats`` generations (cycling over ``batches``) and each batch's output."""
    times, outs = [], []
    for i in range(max(repeats, len(batches))):
        noise, cond = batches[i % len(batches)]
        start = time.perf_counter()
        result = run(noise, cond)
        times.append(time.perf_counter() - start)
        if i < len(batches):
            outs.append(result)
    return times, outs


def fidelity(outs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Returns the mean PSNR (dB, capped at PSNR_CAP) of ``outs`` against the no-cache ``reference``."""
    values = torch.cat([psnr(o, r) for o, r in zip(outs, reference, strict=True)])
    return float(values.clamp(max=PSNR_CAP).mean())


def candidates(
    flop_shares: dict[int, float],
    steps: int,
    intervals: Iterable[int],
    schedules: Iterable[str],
    full_s: float,
    center: int,
    power: float,
) -> tuple[list[Candidate], int]:
    """Returns every valid configuration with its predicted latency, and how many had no schedule.

    The prediction scales ``full_s``, the latency of a generation of full steps, by the FLOP
    share of the steps: (full + shallow r) / steps. A non-uniform schedule with no solution at
    this step count is skipped (counted).
    """
    out, infeasible = [], 0
    for branch, r in sorted(flop_shares.items()):
        for schedule in schedules:
            for interval in intervals:
                extra = {"center": center, "power": power} if schedule == "non-uniform" else {}
                cfg = DeepCacheConfig(branch=branch, interval=interval, schedule=schedule, steps=None, **extra)
                try:
                    full = len(full_step_indices(cfg, steps))
                except ValueError:
                    infeasible += 1
                    continue
                predicted = full_s * (full + (steps - full) * r) / steps
                cfg = dataclasses.replace(cfg, steps=steps) if schedule == "non-uniform" else cfg
                out.append(Candidate(cfg, steps, full, r, predicted))
    return out, infeasible


def pareto(points: Sequence[Measurement]) -> list[Measurement]:
    """Returns the measurements no other beats on both latency and quality, fastest first."""
    front: list[Measurement] = []
    for m in sorted(points, key=lambda p: (p.latency_s, -p.psnr_db)):
        if not front or m.psnr_db > front[-1].psnr_db:
            front.append(m)
    return front


def choose(points: Sequence[Measurement], goal: Goal, baseline_s: float) -> Measurement | None:
    """Returns the measurement that best meets ``goal``, or None when none meets it."""
    if goal.kind == "quality":
        ok = [m for m in points if m.psnr_db >= goal.value]
        return min(ok, key=lambda m: (m.latency_s, -m.psnr_db), default=None)
    budget = goal.value if goal.kind == "latency" else baseline_s / goal.value
    ok = [m for m in points if m.latency_s <= budget]
    return max(ok, key=lambda m: (m.psnr_db, -m.latency_s), default=None)


class _Cache:
    """Measured results on disk, one JSON file per workload key."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path is not None and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                self.data = {}  # a damaged cache is measured again, not trusted

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def _weights_digest(unet: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in unet.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dcfx": dcfx.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def tune(
    model: str | Workload = "digits",
    *,
    scheduler: str = "ddim",
    steps: int = 50,
    batch: int = 10,
    size: int | None = None,
    backend: str = "eager",
    seeds: int = 20,
    latency: float | None = None,
    speedup: float | None = None,
    quality: float | None = None,
    branches: Sequence[int] | None = None,
    intervals: Sequence[int] = tuple(range(2, 11)),
    schedules: Sequence[str] = ("uniform", "non-uniform"),
    center: int | None = None,
    power: float = 1.4,
    min_speedup: float = 1.1,
    repeats: int = 3,
    out: str | os.PathLike[str] | None = "tune_out",
    cache: str | os.PathLike[str] | bool = True,
    verify: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress: bool = True,
) -> TuneResult:
    """Returns the measured Pareto frontier of DeepCache configurations and the best one for a goal.

    Args:
        model: "digits" (the bundled model), a built-in config name, a diffusers folder, or a
            ``Workload``.
        scheduler: "ddim", "dpm" or "euler".
        steps: Denoising steps per generation.
        batch: Samples per generation (the batch the latency is measured at).
        size: Latent height and width (default: the model's ``sample_size``).
        backend: A registered backend ("eager", "inductor").
        seeds: K, the calibration seeds (one sample each: a class label or a prompt embedding), a
            multiple of ``batch``.
        latency: Goal: seconds per generation at most; the best quality within it is chosen.
        speedup: Goal: at least this speedup over no cache; the best quality is chosen.
        quality: Goal: PSNR (dB) against no cache at least; the lowest latency is chosen.
        branches: Branch ids to consider (default: every branch of the model).
        intervals: Values of N to consider.
        schedules: "uniform" and/or "non-uniform".
        center: The non-uniform schedule's centre (default: 30% of the steps, as the paper's 15 of 50).
        power: The non-uniform schedule's power.
        min_speedup: Candidates whose FLOP-ideal speedup is below this are pruned.
        repeats: At least this many timed generations per candidate (the latency is their median).
        out: Where config.json, report.md, pareto.png and results.json go (None: nowhere).
        cache: True (``out``/cache.json), a path, or False (measure everything again).
        verify: Rerun the chosen configuration from config.json and report it against the tuner's numbers.
        log: Where progress lines and the summary go (default: stderr).
        progress: Show a progress bar.

    Raises:
        ValueError: bad goal (none or several), scheduler, branch, interval, schedule or sizes.
    """
    start = time.perf_counter()
    goals = [Goal(k, v) for k, v in (("latency", latency), ("speedup", speedup), ("quality", quality)) if v is not None]
    if len(goals) > 1:
        raise ValueError(f"give one goal (latency=, speedup= or quality=), got {[g.kind for g in goals]}")
    goal = goals[0] if goals else None
    for name, value, low in (("steps", steps, 2), ("batch", batch, 1), ("seeds", seeds, 1), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if seeds % batch:
        raise ValueError(f"seeds ({seeds}) must be a multiple of batch ({batch}): every generation runs a full batch")
    bad = [s for s in schedules if s not in ("uniform", "non-uniform")]
    if bad or not schedules:
        raise ValueError(f"schedules must be among uniform, non-uniform; got {list(schedules)}")
    bad_n = [n for n in intervals if isinstance(n, bool) or not isinstance(n, int) or n < 2]
    if bad_n or not intervals:
        raise ValueError(f"intervals must be ints >= 2 (1 is no cache), got {list(intervals)}")
    dcfx.backends.get_backend(backend)
    work = model if isinstance(model, Workload) else load_workload(model, scheduler)
    unet = work.unet
    size = size or int(unet.config.sample_size)
    center = round(0.3 * steps) if center is None else center

    spec = dcfx.models.spec_for(unet)
    shape = spec.sample_shape(unet, batch, size, size)
    infos = list_branches(unet, shape)
    valid = [b.branch for b in infos]
    chosen_branches = valid if branches is None else list(branches)
    unknown = [b for b in chosen_branches if b not in valid]
    if unknown:
        raise ValueError(f"branches {unknown} are not branches of this model; valid: 0..{len(valid) - 1}")
    shares = {b.branch: b.flop_share for b in infos if b.branch in chosen_branches}

    out_dir = Path(out) if out is not None else None
    cache_path = None
    if cache is True and out_dir is not None:
        cache_path = out_dir / "cache.json"
    elif cache not in (True, False):
        cache_path = Path(cache)  # type: ignore[arg-type]
    store = _Cache(cache_path)
    workload = {
        **work.describe(),
        "model_class": type(unet).__name__,
        "weights": _weights_digest(unet),
        "steps": steps,
        "batch": batch,
        "size": size,
        "backend": backend,
        "seeds": seeds,
        "machine": _machine(),
    }
    wkey = hashlib.sha256(json.dumps(workload, sort_keys=True).encode()).hexdigest()[:16]

    seed_list = list(range(seeds))
    chunks = [seed_list[i : i + batch] for i in range(0, seeds, batch)]
    reference: list[torch.Tensor] | None = None
    inputs_cache: list[Batch] | None = None

    def inputs() -> list[Batch]:
        nonlocal inputs_cache
        if inputs_cache is None:
            inputs_cache = [work.inputs(c, size) for c in chunks]
        return inputs_cache

    base = store.get(f"{wkey}:baseline")
    if base is None:
        log(f"dcfx tune: no-cache reference, {len(chunks)} x batch {batch}, {steps} steps ...")
        plain_scheduler = work.scheduler()
        generate(unet, plain_scheduler, *inputs()[0], steps=2)  # warm-up
        times, reference = measure(lambda n, c: generate(unet, plain_scheduler, n, c, steps), inputs(), repeats)
        base = {"latency_s": statistics.median(times), "times_s": times}
        store.put(f"{wkey}:baseline", base)
    baseline_s = float(base["latency_s"])

    runtimes: dict[int, Any] = {}

    def runtime(config: DeepCacheConfig) -> Any:
        # One branch's graphs at a time, built (and compiled) untimed: memory stays flat.
        fast = runtimes.get(config.branch)
        if fast is None:
            for old in runtimes.values():
                old.clear_graphs()
            runtimes.clear()
            fast = runtimes[config.branch] = dcfx.compile(unet, config, backend=backend, scheduler=work.scheduler())
            generate(fast, fast.scheduler, *inputs()[0], steps=steps)
        return fast.reschedule(config)

    # The cost model's unit: a generation of full steps through dcfx's graphs (no Python module
    # overhead, unlike the plain U-Net), so that predictions compare with what runs.
    all_full = store.get(f"{wkey}:all-full")
    if all_full is None:
        fast = runtime(DeepCacheConfig(branch=min(shares), interval=1))
        times, _ = measure(functools.partial(generate, fast, fast.scheduler, steps=steps), inputs(), repeats)
        all_full = {"latency_s": statistics.median(times), "times_s": times}
        store.put(f"{wkey}:all-full", all_full)
    full_s = float(all_full["latency_s"])

    pool, infeasible = candidates(shares, steps, intervals, schedules, full_s, center, power)
    counts = {"candidates": len(pool) + infeasible, "no_schedule": infeasible, "pruned": 0, "measured": 0, "cached": 0}

    def hopeless(c: Candidate) -> bool:
        if c.ideal_speedup < min_speedup:
            return True
        if goal is not None and goal.kind in ("latency", "speedup"):
            budget = goal.value if goal.kind == "latency" else baseline_s / goal.value
            return c.predicted_s > budget * (1 + MARGIN)
        return False

    # Pruning saves measuring: what an earlier run measured still joins the frontier.
    keep = [c for c in pool if not hopeless(c) or store.get(f"{wkey}:{c.key}") is not None]
    counts["pruned"] = len(pool) - len(keep)
    keep.sort(key=lambda c: c.predicted_s)

    measured: list[Measurement] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keep), desc="dcfx tune", file=sys.stderr, leave=False)
    for cand in keep:
        key = f"{wkey}:{cand.key}"
        hit = store.get(key)
        from_cache = hit is not None
        if goal is not None and goal.kind == "quality" and not from_cache:
            best = choose(measured, goal, baseline_s)
            if best is not None and cand.predicted_s * (1 - MARGIN) > best.latency_s:
                counts["pruned"] += 1  # cannot beat the fastest that meets the floor
                if bar is not None:
                    bar.update()
                continue
        if hit is None:
            if reference is None:
                plain_scheduler = work.scheduler()
                reference = [generate(unet, plain_scheduler, n, c, steps) for n, c in inputs()]
            fast = runtime(cand.config)
            times, outs = measure(functools.partial(generate, fast, fast.scheduler, steps=steps), inputs(), repeats)
            hit = {"latency_s": statistics.median(times), "times_s": times, "psnr_db": fidelity(outs, reference)}
            store.put(key, hit)
            counts["measured"] += 1
        else:
            counts["cached"] += 1
        measured.append(
            Measurement(
                config=cand.config.to_dict(),
                full_steps=cand.full_steps,
                flop_share=cand.flop_share,
                predicted_s=cand.predicted_s,
                latency_s=float(hit["latency_s"]),
                times_s=list(hit["times_s"]),
                psnr_db=float(hit["psnr_db"]),
                cached=from_cache,
            )
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    for fast in runtimes.values():
        fast.clear_graphs()

    front = pareto(measured)
    chosen = choose(measured, goal, baseline_s) if goal is not None else None
    result = TuneResult(
        workload={k: v for k, v in workload.items() if k != "machine"},
        goal=goal,
        baseline_s=baseline_s,
        full_s=full_s,
        measurements=measured,
        frontier=front,
        chosen=chosen,
        check=None,
        counts=counts,
        wall_s=0.0,
        out=out_dir,
        machine=workload["machine"],
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if chosen is not None:
            write_config(result, out_dir / "config.json")
    if verify and chosen is not None:
        result.check = check_choice(work, chosen, baseline_s, steps, backend, inputs(), repeats, out_dir, log)
    result.wall_s = time.perf_counter() - start
    if out_dir is not None:
        write_outputs(result, out_dir)
    log(summary(result))
    return result


def write_config(result: TuneResult, path: Path) -> None:
    """Writes the chosen configuration as a DeepCacheConfig JSON (``dcfx.compile(config=path)`` reads it)."""
    chosen = result.chosen
    assert chosen is not None
    data = {
        "deepcache": chosen.config,
        "tune": {
            "goal": dataclasses.asdict(result.goal) if result.goal else None,
            "workload": result.workload,
            "latency_s": chosen.latency_s,
            "psnr_db": chosen.psnr_db,
            "baseline_s": result.baseline_s,
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_choice(
    work: Workload,
    chosen: Measurement,
    baseline_s: float,
    steps: int,
    backend: str,
    batches: Sequence[Batch],
    repeats: int,
    out_dir: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Returns a fresh run of the chosen configuration (from config.json when written) against the tuner's numbers."""
    config: Any = out_dir / "config.json" if out_dir is not None else DeepCacheConfig.from_dict(chosen.config)
    log(f"dcfx tune: checking the choice {chosen.config} with a fresh runtime ...")
    unet = work.unet
    plain_scheduler = work.scheduler()
    reference = [generate(unet, plain_scheduler, n, c, steps) for n, c in batches]
    fast = dcfx.compile(unet, config, backend=backend, scheduler=work.scheduler())
    generate(fast, fast.scheduler, *batches[0], steps=steps)  # build and warm up, untimed
    # More runs than a candidate gets: the check is one configuration, and a shared host drifts.
    times, outs = measure(lambda n, c: generate(fast, fast.scheduler, n, c, steps), batches, max(5, repeats + 2))
    fast.clear_graphs()
    quality_db = fidelity(outs, reference)
    latency = statistics.median(times)
    return {
        "config_file": str(config) if isinstance(config, Path) else None,
        "latency_s": latency,
        "psnr_db": quality_db,
        "tuned_latency_s": chosen.latency_s,
        "tuned_psnr_db": chosen.psnr_db,
        "predicted_latency_s": chosen.predicted_s,
        "latency_error": latency / chosen.latency_s - 1,
        "prediction_error": latency / chosen.predicted_s - 1,
        "psnr_error_db": quality_db - chosen.psnr_db,
        "speedup": baseline_s / latency,
    }


def _label(m: Measurement) -> str:
    c = m.config
    kind = "nu" if c.get("schedule") == "non-uniform" else "u"
    return f"b{c['branch']} N={c['interval']} {kind}"


def frontier_table(result: TuneResult) -> str:
    """Returns the Pareto frontier as a markdown table."""
    lines = [
        "| branch | N | schedule | r | predicted s | latency s | speedup | PSNR dB | chosen |",
        "|---:|---:|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for m in result.frontier:
        c = m.config
        lines.append(
            f"| {c['branch']} | {c['interval']} | {c['schedule']} | {m.flop_share:.3f} | {m.predicted_s:.3f} "
            f"| {m.latency_s:.3f} | {m.speedup(result.baseline_s):.2f}x | {m.psnr_db:.1f} "
            f"| {'**yes**' if m is result.chosen else ''} |"
        )
    return "\n".join(lines)


def summary(result: TuneResult) -> str:
    """Returns the tuner's findings as text: counts, the frontier, the choice and its check."""
    w, n = result.workload, result.counts
    lines = [
        f"dcfx tune: {w['model']} ({w['model_class']}), {w['scheduler']}, {w['steps']} steps, batch {w['batch']}, "
        f"{w['size']}x{w['size']}, {w['backend']}, {w['seeds']} calibration seeds",
        f"no cache: {result.baseline_s:.3f} s per generation (plain U-Net); dcfx at N=1 (every step full, the cost "
        f"model's unit): {result.full_s:.3f} s",
        f"candidates {n['candidates']} (no schedule at this step count: {n['no_schedule']}), pruned by the cost "
        f"model {n['pruned']}, measured {n['measured']}, from the cache {n['cached']}; {result.wall_s:.0f} s",
        "Pareto frontier (latency against PSNR to no cache):",
        frontier_table(result),
    ]
    if result.goal is not None:
        lines.append(f"goal: {result.goal.describe()}")
        if result.chosen is None:
            lines.append("no configuration meets the goal (see the frontier for what is reachable)")
        else:
            c = result.chosen
            lines.append(
                f"chosen: {c.config} -> {c.latency_s:.3f} s ({c.speedup(result.baseline_s):.2f}x), "
                f"PSNR {c.psnr_db:.1f} dB"
            )
    if result.check is not None:
        k = result.check
        lines.append(
            f"check (fresh run from config.json): {k['latency_s']:.3f} s ({k['speedup']:.2f}x), "
            f"PSNR {k['psnr_db']:.1f} dB; "
            f"against the tuner's measurement {k['latency_error']:+.1%} latency, {k['psnr_error_db']:+.2f} dB; "
            f"against the FLOP cost model {k['prediction_error']:+.1%}"
        )
    return "\n".join(lines)


def write_outputs(result: TuneResult, out_dir: Path) -> None:
    """Writes results.json, report.md and pareto.png into ``out_dir``."""
    data = {
        "workload": result.workload,
        "machine": result.machine,
        "goal": dataclasses.asdict(result.goal) if result.goal else None,
        "baseline_s": result.baseline_s,
        "full_s": result.full_s,
        "counts": result.counts,
        "wall_s": result.wall_s,
        "measurements": [dataclasses.asdict(m) for m in result.measurements],
        "frontier": [m.config for m in result.frontier],
        "chosen": result.chosen.config if result.chosen else None,
        "check": result.check,
    }
    (out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    report = ["# dcfx tune report", "", "```", summary(result), "```", "", "![Pareto frontier](pareto.png)", ""]
    report += [
        "## Every measured configuration",
        "",
        frontier_table(dataclasses.replace(result, frontier=sorted(result.measurements, key=lambda m: m.latency_s))),
    ]
    (out_dir / "report.md").write_text("\n".join(report) + "\n")
    plot_pareto(result, out_dir / "pareto.png")


def plot_pareto(result: TuneResult, path: Path) -> None:
    """Draws every measured configuration (latency against PSNR), the frontier and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"uniform": "o", "non-uniform": "s"}
    colours = plt.get_cmap("tab10")
    branch_ids = sorted({m.config["branch"] for m in result.measurements})
    for m in result.measurements:
        colour = colours(branch_ids.index(m.config["branch"]) % 10)
        ax.scatter(m.latency_s, m.psnr_db, color=colour, marker=markers[m.config["schedule"]], s=28, alpha=0.8)
    for i, b in enumerate(branch_ids):
        ax.scatter([], [], color=colours(i % 10), marker="o", s=28, label=f"branch {b}")
    for schedule, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, s=28, label=schedule)
    front = result.frontier
    ax.plot([m.latency_s for m in front], [m.psnr_db for m in front], "k-", lw=1, label="Pareto frontier")
    ax.axvline(result.baseline_s, color="grey", ls=":", lw=1, label=f"no cache ({result.baseline_s:.2f} s)")
    if result.goal is not None and result.goal.kind in ("latency", "speedup"):
        budget = result.goal.value if result.goal.kind == "latency" else result.baseline_s / result.goal.value
        ax.axvline(budget, color="tab:red", ls="--", lw=1, label="latency goal")
    if result.goal is not None and result.goal.kind == "quality":
        ax.axhline(result.goal.value, color="tab:red", ls="--", lw=1, label="quality goal")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.latency_s], [c.psnr_db], s=220, facecolors="none", edgecolors="tab:red", lw=2, label="chosen")
        ax.annotate(_label(c), (c.latency_s, c.psnr_db), textcoords="offset points", xytext=(8, -14), color="tab:red")
    w = result.workload
    ax.set_xlabel(f"latency per generation (s), {w['backend']}, batch {w['batch']}")
    ax.set_ylabel("PSNR against no cache (dB)")
    ax.set_title(f"dcfx tune: {w['model']}, {w['scheduler']} {w['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
