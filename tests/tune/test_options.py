"""``tune``'s settings grouped: SearchSpace (what to search) and MeasureSettings (how to measure)."""

from __future__ import annotations

import pytest

from dcfx.tune import MeasureSettings, SearchSpace, TuneSettingsError, tune
from dcfx.tune.options import gather


def test_flat_keywords_fill_the_groups_and_override_what_they_hold():
    space, measure = gather(SearchSpace(steps=20, intervals=[2, 3]), None, {"batch": 4, "intervals": [5]})
    assert space.steps == 20 and space.intervals == (5,)  # lists normalised to tuples: hashable
    assert measure.batch == 4 and measure.backend == "eager"
    assert hash(space) == hash(SearchSpace(steps=20, intervals=(5,)))


def test_an_unknown_setting_is_a_type_error_naming_both_groups():
    with pytest.raises(
        TypeError, match=r"unknown settings \['interval'\].*intervals.*\(SearchSpace\).*\(MeasureSettings\)"
    ):
        tune("digits", interval=3, out=None, progress=False)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SearchSpace(steps=1), "steps must be an int >= 2"),
        (lambda: MeasureSettings(scheduler="heun"), "valid: ddim, dpm, euler"),
        (lambda: MeasureSettings(seeds=7, batch=2), r"seeds \(7\) must be a multiple of batch \(2\)"),
    ],
)
def test_a_bad_group_is_refused_when_built(make, match):
    with pytest.raises(TuneSettingsError, match=match):
        make()
