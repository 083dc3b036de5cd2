"""What the tuner optimises, the Pareto frontier of what it measured, and the choice for a goal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dcfx.tune.measure import Measurement

GOALS = ("latency", "speedup", "quality")


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

    def budget_s(self, baseline_s: float) -> float | None:
        """Returns the latency a latency or speedup goal allows (s per generation); None for a quality goal."""
        if self.kind == "latency":
            return self.value
        if self.kind == "speedup":
            return baseline_s / self.value
        return None


def pareto(points: Sequence[Measurement]) -> list[Measurement]:
    """Returns the measurements no other beats on both latency and quality, fastest first."""
    front: list[Measurement] = []
    for m in sorted(points, key=lambda p: (p.latency_s, -p.psnr_db)):
        if not front or m.psnr_db > front[-1].psnr_db:
            front.append(m)
    return front


def choose(points: Sequence[Measurement], goal: Goal, baseline_s: float) -> Measurement | None:
    """Returns the measurement that best meets ``goal``, or None when none meets it."""
    budget = goal.budget_s(baseline_s)
    if budget is None:
        ok = [m for m in points if m.psnr_db >= goal.value]
        return min(ok, key=lambda m: (m.latency_s, -m.psnr_db), default=None)
    ok = [m for m in points if m.latency_s <= budget]
    return max(ok, key=lambda m: (m.psnr_db, -m.latency_s), default=None)
