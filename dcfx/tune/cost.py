"""The tuner's cost model: every candidate configuration and its latency predicted from FLOPs.

A candidate's latency is predicted as T1 x (full + shallow r) / steps, T1 being a measured
generation of full steps through dcfx's graphs and r its branch's FLOP share. Candidates that
cannot pay, or cannot meet a latency or speedup goal even with a generous margin, are pruned
before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dcfx.config import DeepCacheConfig
from dcfx.schedule import full_step_indices, get_schedule

# The schedules tune searches: those set by the interval alone, or by the interval and the
# settings ``tune`` takes for them (``center``, ``power``). Explicit and window schedules need
# per-candidate step lists that a sweep over N does not give.
SEARCHABLE_SCHEDULES = ("uniform", "non-uniform")
# A prediction from FLOPs may be this far off the measured latency (shallow steps often run
# faster per FLOP than full ones on a CPU): pruning keeps anything within the margin.
MARGIN = 0.25


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


def check_schedules(schedules: Iterable[str]) -> None:
    """Raises ValueError unless ``schedules`` is a non-empty list of schedules tune searches."""
    schedules = list(schedules)
    bad = [s for s in schedules if s not in SEARCHABLE_SCHEDULES]
    if bad or not schedules:
        raise ValueError(f"schedules must be among {', '.join(SEARCHABLE_SCHEDULES)}; got {schedules}")


def candidate_config(
    branch: int, interval: int, schedule: str, steps: int, settings: Mapping[str, Any]
) -> DeepCacheConfig:
    """Returns the config of one candidate: ``settings`` (and ``steps``) go to the schedule that reads them.

    The step count rides along with a schedule that reads it (non-uniform), so that the written
    config runs without a scheduler too.
    """
    fields = get_schedule(schedule).fields
    extra = {k: v for k, v in {**settings, "steps": steps}.items() if k in fields}
    return DeepCacheConfig(branch=branch, interval=interval, schedule=schedule, **extra)  # type: ignore[arg-type]


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
    share of the steps: (full + shallow r) / steps. A schedule with no solution at this step
    count (a non-uniform centre outside the steps, or no power that gives N) is skipped (counted).
    """
    settings = {"center": center, "power": power}
    out, infeasible = [], 0
    for branch, r in sorted(flop_shares.items()):
        for schedule in schedules:
            for interval in intervals:
                try:
                    cfg = candidate_config(branch, interval, schedule, steps, settings)
                    full = len(full_step_indices(cfg, steps))
                except ValueError:
                    infeasible += 1
                    continue
                predicted = full_s * (full + (steps - full) * r) / steps
                out.append(Candidate(cfg, steps, full, r, predicted))
    return out, infeasible
