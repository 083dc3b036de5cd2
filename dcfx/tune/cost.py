"""The tuner's cost model: every candidate configuration and its latency predicted from FLOPs.

A candidate is a step count k and either no cache (every one of the k steps full) or a
DeepCache configuration: cut x interval x schedule x forecast mode, the cut being a U-Net's
branch or a transformer's block range (``dcfx.tune.cuts``). Its latency is predicted as
T1 x (full + shallow r) / steps, T1 being a measured generation of the reference ``steps``
full steps through dcfx's graphs and r its cut's FLOP share; a forecast mode
costs what reuse does (one elementwise op more per shallow step), so the prediction is the
same and only the measurement tells them apart. Candidates that cannot pay, or cannot meet a
latency or speedup goal even with a generous margin, are pruned before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dcfx.config import DeepCacheConfig
from dcfx.forecast import available_forecasts
from dcfx.planner import Planner
from dcfx.schedule import get_schedule
from dcfx.tune.cuts import Cut, cut_fields

# The schedules tune searches: those set by the interval alone, or by the interval and the
# settings ``tune`` takes for them (``center``, ``power``). Explicit and window schedules need
# per-candidate step lists that a sweep over N does not give.
SEARCHABLE_SCHEDULES = ("uniform", "non-uniform")
# A prediction from FLOPs may be this far off the measured latency (shallow steps often run
# faster per FLOP than full ones on a CPU): pruning keeps anything within the margin.
MARGIN = 0.25


@dataclass(frozen=True)
class Candidate:
    """One configuration the tuner considers, with what the cost model predicts for it.

    Attributes:
        config: The DeepCache configuration; interval 1 is no cache (every step full).
        steps: The step count it samples with (k).
        reference_steps: The step count of the no-cache reference its quality is measured against.
        full_steps: How many of its ``steps`` are full.
        flop_share: Its cut's FLOP share r (1.0 without cache).
        predicted_s: The cost model's latency per generation.
    """

    config: DeepCacheConfig
    steps: int
    reference_steps: int
    full_steps: int
    flop_share: float
    predicted_s: float

    @property
    def caches(self) -> bool:
        """Whether any step is shallow (False: no cache, at ``steps`` steps)."""
        return self.config.interval > 1

    @property
    def key(self) -> str:
        """The configuration and its step count as a stable string (the cache key within a workload).

        No cache is one key per step count, whatever cut runs it; the step count joins the
        key only where it differs from the reference's, so that caches written before step
        counts were searched stay valid.
        """
        data = self.config.to_dict() if self.caches else {"interval": 1}
        if self.steps != self.reference_steps:
            data = {**data, "sampling_steps": self.steps}
        return json.dumps(data, sort_keys=True)

    @property
    def ideal_speedup(self) -> float:
        """The FLOP-ideal speedup over the no-cache reference: reference steps / (full + shallow r)."""
        return self.reference_steps / (self.full_steps + (self.steps - self.full_steps) * self.flop_share)


def check_schedules(schedules: Iterable[str]) -> None:
    """Raises ValueError unless ``schedules`` is a non-empty list of schedules tune searches."""
    schedules = list(schedules)
    bad = [s for s in schedules if s not in SEARCHABLE_SCHEDULES]
    if bad or not schedules:
        raise ValueError(f"schedules must be among {', '.join(SEARCHABLE_SCHEDULES)}; got {schedules}")


def check_forecasts(forecasts: Iterable[str]) -> tuple[str, ...]:
    """Returns ``forecasts`` without repeats; ValueError unless each is a registered forecast mode."""
    forecasts = list(forecasts)
    valid = available_forecasts()
    bad = [f for f in forecasts if f not in valid]
    if bad or not forecasts:
        raise ValueError(f"forecasts must be among the registered modes {', '.join(valid)}; got {forecasts}")
    return tuple(dict.fromkeys(forecasts))


def check_step_counts(step_counts: Iterable[int], steps: int) -> tuple[int, ...]:
    """Returns ``step_counts`` without repeats, largest first; ValueError unless each is an int in [2, steps].

    More steps than the reference are refused: quality is measured against the reference, and
    a longer generation is not a faster competitor.
    """
    counts = list(step_counts)
    bad = [k for k in counts if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= steps]
    if bad or not counts:
        raise ValueError(f"step_counts must be ints in [2, steps={steps}], got {counts}")
    return tuple(sorted(set(counts), reverse=True))


def candidate_config(
    cut: Cut,
    interval: int,
    schedule: str,
    steps: int,
    settings: Mapping[str, Any],
    forecast: str = "none",
) -> DeepCacheConfig:
    """Returns the config of one candidate: ``settings`` (and ``steps``) go to the schedule that reads them.

    The step count rides along with a schedule that reads it (non-uniform), so that the written
    config runs without a scheduler too.
    """
    fields = get_schedule(schedule).fields
    extra = {k: v for k, v in {**settings, "steps": steps}.items() if k in fields}
    named = {**cut_fields(cut), "interval": interval, "schedule": schedule, "forecast": forecast, **extra}
    return DeepCacheConfig(**named)  # type: ignore[arg-type]


def candidates(
    flop_shares: Mapping[Cut, float],
    steps: int,
    intervals: Iterable[int],
    schedules: Iterable[str],
    full_s: float,
    center: int,
    power: float,
    forecasts: Iterable[str] = ("none",),
    step_counts: Iterable[int] | None = None,
) -> tuple[list[Candidate], int]:
    """Returns every valid configuration with its predicted latency, and how many had no schedule.

    For each step count k of ``step_counts`` (default: ``steps`` only): no cache at k steps
    where k is fewer than ``steps`` (at ``steps`` that is the reference itself), and every
    cut (a branch id, or a transformer's ``(first, last)``) x schedule x interval x forecast
    mode at k steps. The non-uniform schedule's
    ``center`` is given for ``steps`` and scaled to k.

    The prediction scales ``full_s``, the latency of a generation of ``steps`` full steps, by
    the FLOP share of the candidate's steps: (full + shallow r) / steps. A schedule with no
    solution at a step count (a non-uniform centre outside the steps, or no power that gives N)
    is skipped (counted). No cache runs through dcfx's graphs with every step full (interval
    1) at the first cut, so its latency compares with the others' and its config file runs
    as measured.
    """
    forecasts = check_forecasts(forecasts)
    counts = (steps,) if step_counts is None else check_step_counts(step_counts, steps)
    intervals, schedules = list(intervals), list(schedules)
    first = min(flop_shares)
    out, infeasible = [], 0
    for k in counts:
        if k < steps:
            plain = DeepCacheConfig(**cut_fields(first), interval=1)  # type: ignore[arg-type]
            out.append(Candidate(plain, k, steps, k, 1.0, full_s * k / steps))
        settings = {"center": round(center * k / steps), "power": power}
        for cut, r in sorted(flop_shares.items()):
            for schedule in schedules:
                for interval in intervals:
                    try:
                        reuse = candidate_config(cut, interval, schedule, k, settings)
                        full = len(Planner(reuse).full_steps(k))
                    except ValueError:
                        infeasible += len(forecasts)
                        continue
                    predicted = full_s * (full + (k - full) * r) / steps
                    for forecast in forecasts:
                        cfg = candidate_config(cut, interval, schedule, k, settings, forecast)
                        out.append(Candidate(cfg, k, steps, full, r, predicted))
    return out, infeasible
