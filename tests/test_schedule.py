import pytest

from dcfx import DeepCacheConfig
from dcfx.schedule import full_step_indices, non_uniform_full_steps, plan


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
    assert plan(DeepCacheConfig(interval=3, schedule="non-uniform", steps=20)).num_steps == 20


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
