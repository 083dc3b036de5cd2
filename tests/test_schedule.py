import dataclasses
from typing import ClassVar

import pytest

from dcfx import DeepCacheConfig
from dcfx import schedule as schedule_module
from dcfx.schedule import (
    Explicit,
    NonUniform,
    Schedule,
    Uniform,
    Window,
    available_schedules,
    full_step_indices,
    get_schedule,
    non_uniform_full_steps,
    plan,
)


def test_every_reference_non_uniform_vector(reference_schedules):
    cases = reference_schedules["cases"]
    assert len(cases) > 100
    for case in cases:
        args = (case["steps"], case["interval"], case["center"], case["power"])
        if "error" in case:
            with pytest.raises(ValueError, match="no power > 1"):
                non_uniform_full_steps(*args)
            continue
        full, power = non_uniform_full_steps(*args)
        assert full == case["full_steps"], case
        assert power == pytest.approx(case["power_used"], abs=1e-12), case


def test_non_uniform_plan_uses_the_reference_vector(reference_schedules):
    case = next(c for c in reference_schedules["cases"] if c["steps"] == 50 and "error" not in c)
    cfg = DeepCacheConfig(interval=case["interval"], schedule="non-uniform", center=case["center"], power=case["power"])
    assert full_step_indices(cfg, 50) == case["full_steps"]


def test_non_uniform_without_step_count_says_what_to_pass():
    cfg = DeepCacheConfig(interval=3, schedule="non-uniform")
    with pytest.raises(ValueError, match="scheduler="):
        plan(cfg, None)
    # With steps= the plan is the schedule for that many steps.
    assert plan(DeepCacheConfig(interval=3, schedule="non-uniform", steps=20)).rule == Explicit(
        3, (0, 4, 8, 11, 14, 15, 17)
    )


@pytest.mark.parametrize(("interval", "expected"), [(1, list(range(10))), (3, [0, 3, 6, 9]), (5, [0, 5]), (20, [0])])
def test_uniform(interval, expected):
    assert full_step_indices(DeepCacheConfig(interval=interval), 10) == expected


def test_explicit_always_includes_step_zero():
    cfg = DeepCacheConfig(schedule="explicit", full_steps=[7, 3, 3])
    assert cfg.full_steps == (3, 7)
    assert full_step_indices(cfg, 10) == [0, 3, 7]


def test_window_full_outside_uniform_inside():
    cfg = DeepCacheConfig(interval=3, schedule="window", start=2, stop=9)
    assert full_step_indices(cfg, 12) == [0, 1, 2, 5, 8, 9, 10, 11]
    open_ended = DeepCacheConfig(interval=4, schedule="window", start=3)
    assert full_step_indices(open_ended, 12) == [0, 1, 2, 3, 7, 11]


@pytest.mark.parametrize(
    ("fields", "kind", "per_step_count", "needs_step_count"),
    [
        ({}, Uniform, False, False),
        ({"schedule": "non-uniform"}, NonUniform, True, True),
        ({"schedule": "non-uniform", "steps": 20}, NonUniform, True, False),
        ({"schedule": "explicit", "full_steps": [2]}, Explicit, False, False),
        ({"schedule": "window", "start": 2}, Window, False, False),
    ],
)
def test_each_config_dispatches_to_its_typed_schedule(fields, kind, per_step_count, needs_step_count):
    cfg = DeepCacheConfig(interval=4, **fields)
    spec = cfg.schedule_spec
    assert type(spec) is kind and spec.name == cfg.schedule and spec.interval == 4
    assert spec.per_step_count is per_step_count and spec.needs_step_count() is needs_step_count
    # The config stores what the schedule object validated and filled in.
    assert {f: getattr(cfg, f) for f in kind.fields} == spec.config_fields()
    assert get_schedule(cfg.schedule) is kind


def test_a_non_uniform_plan_resolves_to_explicit_full_steps():
    p = NonUniform(3, center=15, power=1.4).plan(20)
    assert p.rule == Explicit(3, (0, 4, 8, 11, 14, 15, 17))
    assert NonUniform(3, center=15, steps=20).is_full(11) and not NonUniform(3, center=15, steps=20).is_full(12)


def test_a_registered_schedule_needs_no_change_elsewhere(monkeypatch):
    # A new kind reads existing config fields: it is validated, stored, planned and run by name.
    @dataclasses.dataclass(frozen=True)
    class FullTail(Schedule):
        """Uniform 1:N, every step from ``start`` on full."""

        fields: ClassVar[tuple[str, ...]] = ("start",)
        start: int | None = None

        def is_full(self, step: int) -> bool:
            return step >= (self.start or 0) or step % self.interval == 0

    registry = schedule_module._SCHEDULES
    monkeypatch.setitem(registry._entries, "full-tail", FullTail)
    monkeypatch.setitem(registry._options, "full-tail", FullTail.fields)
    monkeypatch.setattr(FullTail, "name", "full-tail")
    assert "full-tail" in available_schedules()
    cfg = DeepCacheConfig(interval=4, schedule="full-tail", start=7)
    assert full_step_indices(cfg, 10) == [0, 4, 7, 8, 9]
    assert DeepCacheConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"stop= does not apply to schedule 'full-tail'; it takes start"):
        DeepCacheConfig(schedule="full-tail", stop=3)


def test_schedule_objects_validate_like_the_config():
    with pytest.raises(ValueError, match="interval must be an int >= 1, got 0"):
        Uniform(0)
    with pytest.raises(ValueError, match=r"non-uniform center 12 is outside the 10 steps"):
        NonUniform(2, center=12, steps=10)
    with pytest.raises(ValueError, match="window start must be < stop, got start=4, stop=2"):
        Window(2, start=4, stop=2)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; registered: explicit, non-uniform, uniform"):
        get_schedule("cosine")
