"""The planner on its own: the decisions and anchors of a generation, step by step."""

from __future__ import annotations

import logging

import pytest

from dcfx.config import DeepCacheConfig
from dcfx.planner import FULL, SHALLOW, Decision, Planner


def run(plan, positions, sources):
    """Steps a plan through ``positions``; returns its decisions (a full step's payload: its step index)."""
    decisions = []
    for step, (position, source) in enumerate(zip(positions, sources, strict=True)):
        decision = plan.decide(step, position, source)
        if decision.full:
            plan.record_full(decision, position, source, payload=step)
        decisions.append(decision)
    return decisions


def test_reuse_reads_the_newest_feature_between_full_steps():
    plan = Planner(DeepCacheConfig(interval=3)).start(7)
    decisions = run(plan, [900.0 - 100 * i for i in range(7)], ["g"] * 7)
    assert decisions == [FULL, SHALLOW, SHALLOW, FULL, SHALLOW, SHALLOW, FULL]
    assert plan.newest.payload == 6 and plan.previous is None


def test_a_forecast_reads_the_last_two_full_steps_of_one_source():
    plan = Planner(DeepCacheConfig(interval=3, forecast="linear")).start(7)
    decisions = run(plan, [900.0 - 100 * i for i in range(7)], ["g"] * 7)
    # Steps 1-2 hold one feature: reuse. From step 3 on two: the line through them, c = (s - s1) / (s1 - s0).
    assert decisions[:3] == [FULL, SHALLOW, SHALLOW]
    assert decisions[3] == Decision(True, rotate=True)
    assert [d.coefficient for d in decisions[4:6]] == pytest.approx([1 / 3, 2 / 3])
    assert (plan.previous.payload, plan.newest.payload) == (3, 6)


def test_a_stale_source_makes_the_step_full_and_drops_the_older_anchor():
    plan = Planner(DeepCacheConfig(interval=4, forecast="linear")).start(8)
    run(plan, [800.0, 700.0, 600.0, 500.0, 400.0], ["a"] * 5)  # full at 0 and 4: two anchors of "a"
    assert plan.previous is not None
    decision = plan.decide(5, 300.0, "b")  # other graphs or inputs: their feature would be stale
    assert decision == FULL
    assert sorted(plan.record_full(decision, 300.0, "b", payload=5)) == [0, 4]  # both anchors released
    assert plan.previous is None and plan.decide(6, 200.0, "b") == SHALLOW


def test_a_full_step_at_the_newest_position_replaces_it():
    plan = Planner(DeepCacheConfig(interval=1, forecast="linear")).start(3)
    run(plan, [900.0, 900.0, 800.0], ["g"] * 3)  # a sampler that repeats a timestep
    assert (plan.previous.position, plan.newest.position) == (900.0, 800.0)
    assert plan.previous.payload == 1  # step 1 replaced step 0 at 900


def test_begin_full_frees_what_the_step_drops_before_it_runs():
    plan = Planner(DeepCacheConfig(interval=2)).start(4)
    run(plan, [9.0, 8.0], ["g", "g"])
    decision = plan.decide(2, 7.0, "g")
    assert plan.begin_full(decision, "g") == [0] and plan.newest is None  # a failing step leaves no feature
    plan.end_full(7.0, "g", payload=2)
    assert plan.drop() == [2] and plan.newest is None


def test_full_steps_match_the_schedule_and_refuse_what_has_no_solution():
    assert Planner(DeepCacheConfig(interval=3)).full_steps(10) == [0, 3, 6, 9]
    cfg = DeepCacheConfig(interval=3, schedule="non-uniform", center=15, steps=20)
    assert Planner(cfg).full_steps(20) == [0, 4, 8, 11, 14, 15, 17]
    with pytest.raises(ValueError, match="outside the 10 steps"):
        Planner(cfg).full_steps(10)


def test_a_generation_too_short_for_its_schedule_runs_uniform(caplog):
    planner = Planner(DeepCacheConfig(interval=3, schedule="non-uniform", center=15, steps=20))
    with caplog.at_level(logging.WARNING, logger="dcfx.planner"):
        plan = planner.start(10)
    assert "runs the uniform 1:3 schedule" in caplog.text
    assert [s for s in range(10) if plan.steps.is_full(s)] == [0, 3, 6, 9]
    assert plan.next_full(4, 10) == 6 and plan.next_full(10, 10) is None
