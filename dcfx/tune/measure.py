"""How ``dcfx tune`` measures: latencies in interleaved rounds, fidelity, and the results cache.

A latency is the median of a candidate's timed generations. On a shared host the load drifts,
so candidates are timed in rounds: each round runs every candidate once, in a shuffled order,
so that a change of load hits all of them alike. Rounds go on until the median of each
candidate is known to within ``Rounds.tolerance`` (its spread, below) or ``Rounds.max_rounds``
have run; a candidate that has settled sits out the remaining rounds.

The spread of a median is the half-width of its distribution-free confidence interval,
relative to it: with n times sorted, the interval [x_k, x_(n+1-k)] holds the true median with
probability 1 - 2 P(Binomial(n, 1/2) < k), and k is the largest that keeps this at least
``LEVEL`` (90%); with fewer than 8 times that is [min, max] (75% at n = 3). It assumes
nothing about the noise, one disturbed run cannot make it look small, and it narrows as
rounds accumulate (about as 1 / sqrt(n)).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dcfx.quality import psnr
from dcfx.version import __version__

# PSNR of identical images is infinite; reported and plotted at this ceiling.
PSNR_CAP = 100.0
# The confidence level of the interval whose half-width is a median's spread.
LEVEL = 0.9


def _coverage(n: int, k: int) -> float:
    # P(x_k <= true median <= x_(n+1-k)) for n independent times: 1 - 2 P(Binomial(n, 1/2) < k).
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def median_interval(times: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Returns the distribution-free confidence interval of the median of ``times`` (order statistics).

    The interval is [x_k, x_(n+1-k)] of the sorted times, k the largest whose coverage is at
    least ``level``; [min, max] when even that falls short (fewer than 8 times at 90%).

    Example:
        >>> median_interval([1.0, 1.1, 0.9, 1.0, 1.2])
        (0.9, 1.2)
    """
    if not times:
        raise ValueError("no times: the median of nothing has no interval")
    xs = sorted(times)
    n, k = len(xs), 1
    while k + 1 <= n // 2 and _coverage(n, k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k]


def median_spread(times: Sequence[float]) -> float:
    """Returns the spread of the median of ``times``: its confidence interval's half-width relative to it.

    Infinite with fewer than two times (nothing is known of the noise yet).

    Example:
        >>> round(median_spread([1.0, 1.1, 0.9, 1.0, 1.2]), 3)  # (1.2 - 0.9) / 2 / 1.0
        0.15
    """
    if len(times) < 2:
        return math.inf
    lo, hi = median_interval(times)
    median = statistics.median(times)
    if median <= 0:
        return 0.0 if hi == lo else math.inf
    return (hi - lo) / 2 / median


@dataclass(frozen=True)
class Rounds:
    """When interleaved timing stops: every candidate within ``tolerance``, or ``max_rounds`` run.

    Attributes:
        min_rounds: Timed generations per candidate at least.
        max_rounds: Timed generations per candidate at most, settled or not.
        tolerance: The spread (relative half-width of the median's confidence interval) a
            candidate must reach.
    """

    min_rounds: int = 3
    max_rounds: int = 10
    tolerance: float = 0.03

    def __post_init__(self) -> None:
        for name in ("min_rounds", "max_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) must be >= min_rounds ({self.min_rounds})")
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"tolerance must be a number in (0, 1) (a relative spread, 0.03 = 3%), got {tol!r}")

    def settled(self, times: Sequence[float]) -> bool:
        """Returns whether ``times`` need no more rounds: enough of them, and their median's spread within tolerance."""
        return len(times) >= self.min_rounds and median_spread(times) <= self.tolerance


@dataclass(frozen=True)
class Timing:
    """The timed generations of one candidate, in the order they ran."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """The latency: the median of the times."""
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """The median's spread (see ``median_spread``)."""
        return median_spread(self.times_s)


# prepare(round) does the untimed set-up of one run (choose the batch, switch the schedule) and
# returns the callable that is timed.
Prepare = Callable[[int], Callable[[], object]]


def time_interleaved(
    runs: Mapping[str, Prepare],
    rounds: Rounds,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, Timing]:
    """Returns the timing of every run in ``runs``, measured in interleaved rounds.

    Round r calls ``runs[key](r)`` (untimed) and times the callable it returns, for every key
    not yet settled, in an order shuffled per round (seeded by ``seed``). Rounds stop when
    every key is settled (``rounds.settled``) or after ``rounds.max_rounds``.

    Args:
        runs: Per key, the preparation of one timed run (see ``Prepare``).
        rounds: When to stop.
        clock: Seconds, monotonic (``time.perf_counter``; tests pass a fake one).
        seed: Seeds the order of each round.
        on_round: Called after each round with the round's index and how many keys remain.

    Example:
        >>> timing = time_interleaved({"a": lambda r: lambda: None}, Rounds(min_rounds=2, max_rounds=5))
        >>> 2 <= len(timing["a"].times_s) <= 5
        True
    """
    times: dict[str, list[float]] = {key: [] for key in runs}
    order = random.Random(seed)
    pending = list(runs)
    for r in range(rounds.max_rounds):
        if not pending:
            break
        order.shuffle(pending)
        for key in pending:
            run = runs[key](r)
            start = clock()
            run()
            times[key].append(clock() - start)
        pending = [key for key in runs if not rounds.settled(times[key])]
        if on_round is not None:
            on_round(r, len(pending))
    return {key: Timing(tuple(t)) for key, t in times.items()}


def fidelity(outs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Returns the mean PSNR (dB, capped at PSNR_CAP) of ``outs`` against the no-cache ``reference``."""
    values = torch.cat([psnr(o, r) for o, r in zip(outs, reference, strict=True)])
    return float(values.clamp(max=PSNR_CAP).mean())


@dataclass
class Measurement:
    """A measured configuration: its config and step count, the prediction and what was measured.

    ``config`` is a ``DeepCacheConfig.to_dict()`` (interval 1: no cache); ``steps`` the step
    count it samples with, which may be fewer than the reference's. ``spread`` is the
    latency's spread (``median_spread``), None when unknown (one timed run, or a cache written
    before spreads were kept).
    """

    config: dict[str, Any]
    steps: int
    full_steps: int
    flop_share: float
    predicted_s: float
    latency_s: float
    times_s: list[float]
    psnr_db: float
    cached: bool = False
    spread: float | None = None

    @property
    def forecast(self) -> str:
        """The forecast mode shallow steps read ("none": the paper's reuse, also for no cache)."""
        return str(self.config.get("forecast", "none"))

    @property
    def caches(self) -> bool:
        """Whether any step is shallow (False: no cache, every one of ``steps`` full)."""
        return int(self.config["interval"]) > 1

    def speedup(self, baseline_s: float) -> float:
        """The measured speedup over the no-cache baseline."""
        return baseline_s / self.latency_s


def finite_spread(times: Sequence[float]) -> float | None:
    """Returns ``median_spread(times)``, or None where it is not finite (JSON has no infinity)."""
    spread = median_spread(times)
    return spread if math.isfinite(spread) else None


def timing_entry(timing: Timing) -> dict[str, Any]:
    """Returns a timing as the results cache stores it: latency, times, spread."""
    return {"latency_s": timing.median_s, "times_s": list(timing.times_s), "spread": finite_spread(timing.times_s)}


class ResultCache:
    """Measured results on disk, one JSON file per workload key; None keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path is not None and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                self.data = {}  # a damaged cache is measured again, not trusted

    def get(self, key: str) -> dict[str, Any] | None:
        """Returns the entry stored under ``key``, or None."""
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Stores ``value`` under ``key`` and writes the file (atomically)."""
        self.data[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def machine() -> dict[str, Any]:
    """Returns what identifies this machine and software (part of the cache key; written beside results)."""
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
        "dcfx": __version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
