"""dcfx.tune.measure: interleaved rounds, the spread of a median, when timing stops.

A fake clock makes every test deterministic: each run advances it by a scripted duration.
"""

from __future__ import annotations

import math
import statistics

import pytest

from dcfx.tune.measure import Rounds, Timing, median_interval, median_spread, time_interleaved


class FakeClock:
    """A clock that only moves when a run says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, int]] = []  # (key, round) in the order the runs ran

    def __call__(self) -> float:
        return self.now

    def runs(self, durations: dict[str, list[float]]) -> dict:
        """Per key, a preparation whose run of round r takes durations[key][r] seconds."""

        def prepare(key):
            def for_round(r):
                def run():
                    self.calls.append((key, r))
                    self.now += durations[key][r]

                return run

            return for_round

        return {key: prepare(key) for key in durations}


def test_spread_is_the_half_width_of_the_medians_confidence_interval():
    times = [1.0, 1.1, 0.9, 1.0, 1.2]  # five times: the interval is [min, max]
    assert median_interval(times) == (0.9, 1.2)
    assert median_spread(times) == pytest.approx((1.2 - 0.9) / 2 / 1.0)
    assert median_spread([2 * t for t in times]) == pytest.approx(median_spread(times))  # relative
    # The order statistics that keep the coverage at 90% or more: [x2, x7] of 8, [x6, x15] of 20.
    assert median_interval(range(1, 9)) == (2, 7) and median_interval(range(1, 21)) == (6, 15)
    # More rounds of the same noise: a narrower interval.
    assert median_spread(times * 4) < median_spread(times) / 2
    # A disturbed run cannot make a few times look settled (seen here: 4.6, 4.6 and 15.5 s)...
    assert median_spread([4.6, 4.6, 15.49]) > 1
    # ...and from eight times on, one disturbed run on either side is left out.
    assert median_spread([1.0, 1.01, 0.99, 1.0, 9.0, 1.0, 0.2, 1.02]) == pytest.approx(0.015)
    assert median_spread([1.0]) == math.inf and median_spread([]) == math.inf


def test_rounds_interleave_every_candidate_and_stop_when_settled():
    clock = FakeClock()
    durations = {"a": [1.0] * 10, "b": [2.0] * 10, "c": [3.0] * 10}
    timings = time_interleaved(clock.runs(durations), Rounds(min_rounds=3, max_rounds=10, tolerance=0.01), clock)
    # Steady times settle at once: exactly min_rounds runs each, and the times are what ran.
    assert {k: t.times_s for k, t in timings.items()} == {"a": (1.0,) * 3, "b": (2.0,) * 3, "c": (3.0,) * 3}
    # Round r runs every candidate once before any runs round r + 1.
    assert [r for _, r in clock.calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for r in range(3):
        assert sorted(k for k, rr in clock.calls if rr == r) == ["a", "b", "c"]
    # The order within a round is shuffled (seeded), so no candidate always runs first.
    firsts = {clock.calls[3 * r][0] for r in range(3)}
    assert len(firsts) > 1


def test_a_noisy_candidate_runs_more_rounds_alone_up_to_the_cap():
    clock = FakeClock()
    noisy = [1.0, 1.5, 0.7, 1.3, 0.8, 1.4, 0.6, 1.2, 0.9, 1.6, 1.1, 0.5]
    durations = {"steady": [1.0] * 12, "noisy": noisy}
    rounds = Rounds(min_rounds=3, max_rounds=8, tolerance=0.05)
    timings = time_interleaved(clock.runs(durations), rounds, clock)
    assert len(timings["steady"].times_s) == 3  # settled: sits out the later rounds
    assert timings["noisy"].times_s == pytest.approx(noisy[:8])  # never within 5%: stopped by the cap
    assert not rounds.settled(timings["noisy"].times_s) and timings["noisy"].spread > 0.05
    assert [k for k, r in clock.calls if r >= 3] == ["noisy"] * 5
    assert timings["noisy"].median_s == pytest.approx(statistics.median(noisy[:8]))


def test_timing_stops_at_the_first_round_within_tolerance():
    clock = FakeClock()
    durations = {"a": [1.0, 1.3, 0.9, 1.1, 1.05, 0.97, 1.0, 1.0]}  # spreads after 3, 4, 8 runs: 0.2, 0.19, 0.065
    for tolerance, runs in ((0.2, 3), (0.195, 4), (0.1, 8), (0.01, 8)):
        timing = time_interleaved(clock.runs(durations), Rounds(3, 8, tolerance), clock)["a"]
        assert timing.times_s == pytest.approx(durations["a"][:runs]), tolerance
        assert all(median_spread(durations["a"][:n]) > tolerance for n in range(3, runs))
        assert (timing.spread <= tolerance) is (tolerance > 0.01)  # the last one stopped at the cap, unsettled


def test_with_one_round_there_is_no_spread():
    clock = FakeClock()
    timing = time_interleaved(clock.runs({"a": [0.5]}), Rounds(1, 1, 0.03), clock)["a"]
    assert timing == Timing((0.5,)) and timing.median_s == 0.5 and timing.spread == math.inf


def test_the_preparation_is_not_timed():
    clock = FakeClock()

    def prepare(r):
        clock.now += 100.0  # set-up (choosing the batch, switching the schedule) costs nothing timed
        return lambda: setattr(clock, "now", clock.now + 0.25)

    timing = time_interleaved({"a": prepare}, Rounds(2, 2, 0.5), clock)["a"]
    assert timing.times_s == (0.25, 0.25)


def test_on_round_reports_progress():
    clock = FakeClock()
    seen = []
    time_interleaved(
        clock.runs({"a": [1.0] * 4, "b": [1.0, 2.0, 1.5, 3.0]}),
        Rounds(2, 4, 0.01),
        clock,
        on_round=lambda r, left: seen.append((r, left)),
    )
    assert seen == [(0, 2), (1, 1), (2, 1), (3, 1)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_rounds": 0}, "min_rounds must be an int >= 1, got 0"),
        ({"max_rounds": 2.5}, "max_rounds must be an int >= 1, got 2.5"),
        ({"min_rounds": 5, "max_rounds": 3}, r"max_rounds \(3\) must be >= min_rounds \(5\)"),
        ({"tolerance": 0}, r"tolerance must be a number in \(0, 1\) .* got 0"),
        ({"tolerance": 1.5}, r"tolerance must be a number in \(0, 1\) .* got 1.5"),
    ],
)
def test_bad_rounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rounds(**kwargs)


def test_a_cost_model_unit_far_from_the_plain_generation_is_timed_again(monkeypatch):
    import importlib

    from dcfx.tune.measure import ResultCache

    tune_module = importlib.import_module("dcfx.tune.search")  # where tune() looks the names up

    class FakeRunner:
        batches, batch, steps = [None, None], 10, 50

        def reference(self):
            pass

        def plain_run(self, r):
            return lambda: None

        def cached_run(self, config):
            assert config.interval == 1
            return lambda r: lambda: None

    answers = [
        {tune_module.BASELINE: Timing((1.2, 1.2, 1.2)), "all-full": Timing((7.6, 7.6, 7.6))},  # a busy host
        {tune_module.BASELINE: Timing((1.2, 1.2, 1.2)), "all-full": Timing((1.1, 1.1, 1.1))},
    ]
    calls = []
    monkeypatch.setattr(
        tune_module, "time_interleaved", lambda pending, rounds, **kw: calls.append(kw) or answers.pop(0)
    )
    lines: list[str] = []
    store = tune_module._Store(ResultCache(None), "w")
    baseline, unit = tune_module._baseline_and_unit(FakeRunner(), store, 0, Rounds(min_rounds=3), lines.append)
    assert (baseline, unit) == (1.2, 1.1) and len(calls) == 2
    assert any("timing both again" in line for line in lines) and not any("warning" in line for line in lines)
