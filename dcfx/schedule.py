"""Which denoising steps are full: uniform, non-uniform, explicit and window schedules.

A step index counts the U-Net calls of one generation from 0. Step 0 is always full.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from dcfx.config import DeepCacheConfig, check_center

_NO_POWER = "no power > 1 gives the requested number of full steps"


def non_uniform_full_steps(steps: int, interval: int, center: int, power: float) -> tuple[list[int], float]:
    """Returns the full steps of the paper's non-uniform 1:N schedule and the power used.

    Reproduces ``sample_from_quad_center`` of the reference implementation (DeepCache 0.1.1)
    exactly, quirks included: ``(-center) ** (1 / power)`` is complex in Python, numpy keeps
    the complex arithmetic, and the int32 cast keeps only the real part. The power drops by
    0.02 until ``ceil(steps / interval)`` unique indices appear.

    Example:
        >>> non_uniform_full_steps(20, 3, center=15, power=1.4)
        ([0, 4, 8, 11, 14, 15, 17], 1.4)

    Raises:
        ValueError: when no power > 1 yields that many full steps.
    """
    if interval == 1:
        return list(range(steps)), power
    n_samples = math.ceil(steps / interval)
    pw = power
    while pw > 1:
        lo = (-center) ** (1 / pw)
        hi = (steps - center) ** (1 / pw)
        x_values = np.linspace(lo, hi, n_samples + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            ints = np.int32(x_values**pw)
        indices = [0] + [int(x) + center for x in np.unique(ints)[1:-1]]
        if len(indices) == n_samples:
            return sorted(indices), pw
        pw -= 0.02
    raise ValueError(
        f"non-uniform schedule: {_NO_POWER} (steps={steps}, interval={interval}, center={center}, "
        f"power={power}); lower the interval, move center towards steps / 2, or use schedule='uniform'"
    )


@dataclass(frozen=True)
class StepPlan:
    """The full/shallow decision for every step of one generation of ``num_steps`` steps."""

    config: DeepCacheConfig
    num_steps: int | None
    full: frozenset[int] | None

    def is_full(self, step: int) -> bool:
        """Returns whether the schedule makes ``step`` a full step."""
        cfg = self.config
        if step == 0 or cfg.interval == 1:
            return True
        if self.full is not None:
            return step in self.full
        if cfg.schedule == "window":
            if step < cfg.start or (cfg.stop is not None and step >= cfg.stop):
                return True
            return (step - cfg.start) % cfg.interval == 0
        return step % cfg.interval == 0


def plan(config: DeepCacheConfig, num_steps: int | None = None) -> StepPlan:
    """Returns the step plan of ``config`` for a generation of ``num_steps`` steps.

    ``num_steps`` may be None except for the non-uniform schedule, which falls back to
    ``config.steps`` and raises ValueError when neither is known, when ``config.center`` is
    not one of the steps, or when no power gives the requested number of full steps.
    """
    if config.schedule == "explicit":
        return StepPlan(config, num_steps, frozenset(config.full_steps or ()))
    if config.schedule != "non-uniform":
        return StepPlan(config, num_steps, None)
    steps = num_steps if num_steps is not None else config.steps
    if steps is None:
        raise ValueError(
            "the non-uniform schedule needs the number of steps: pass scheduler= to "
            "dcfx.compile (or use dcfx.enable(pipe, ...)), or set steps= in DeepCacheConfig"
        )
    check_center(config.center, steps)
    full, _ = non_uniform_full_steps(steps, config.interval, config.center, config.power)
    return StepPlan(config, steps, frozenset(full))


def full_step_indices(config: DeepCacheConfig, num_steps: int) -> list[int]:
    """Returns the sorted full-step indices of a ``num_steps``-step generation."""
    p = plan(config, num_steps)
    return [i for i in range(num_steps) if p.is_full(i)]
