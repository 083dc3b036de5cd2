"""The scheduler kinds a generation request may name: one fresh diffusers scheduler per request."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import diffusers

from dcfx.registry import Registry

SchedulerFactory = Callable[[Mapping[str, Any]], Any]

_SCHEDULERS: Registry[SchedulerFactory] = Registry("scheduler")


def register_scheduler(name: str, factory: SchedulerFactory) -> None:
    """Registers ``factory(scheduler_config) -> scheduler`` as the scheduler kind ``name``."""
    _SCHEDULERS.add(name, factory)


def available_schedulers() -> list[str]:
    """Returns the registered scheduler kinds."""
    return _SCHEDULERS.names()


def make_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """Returns a fresh scheduler of kind ``name`` over the model's scheduler ``config``.

    Each request gets its own: multistep schedulers (DPM-Solver++) keep the model outputs of
    earlier steps, so two generations never share one.

    Raises:
        ValueError: an unknown name, listing the registered ones.
    """
    return _SCHEDULERS.get(name)(config)


register_scheduler("ddim", lambda config: diffusers.DDIMScheduler.from_config(config))
register_scheduler("dpm", lambda config: diffusers.DPMSolverMultistepScheduler.from_config(config))
register_scheduler("euler", lambda config: diffusers.EulerDiscreteScheduler.from_config(config))
# The flow-matching Euler sampler of SD3 and Flux (a transformer folder's scheduler/ configures it).
register_scheduler("flow", lambda config: diffusers.FlowMatchEulerDiscreteScheduler.from_config(config))
