import pytest

from dcfx import DeepCacheConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"branch": -1}, ValueError, "branch must be an int >= 0"),
        ({"branch": 1.0}, TypeError, "branch must be an int"),
        ({"branch": True}, TypeError, "branch must be an int"),
        ({"interval": 0}, ValueError, "interval must be an int >= 1"),
        ({"interval": -2}, ValueError, "interval"),
        ({"interval": 2.5}, TypeError, "interval"),
        ({"schedule": "cosine"}, ValueError, "valid: uniform, non-uniform, explicit, window"),
        ({"schedule": "non-uniform", "power": 1.0}, ValueError, "power must be > 1"),
        ({"schedule": "non-uniform", "power": "x"}, TypeError, "power must be a number"),
        ({"schedule": "non-uniform", "center": -3}, ValueError, "center"),
        ({"schedule": "explicit"}, TypeError, "needs full_steps="),
        ({"schedule": "explicit", "full_steps": [1, -1]}, ValueError, "full_steps"),
        ({"schedule": "explicit", "full_steps": "0,3"}, TypeError, "full_steps"),
        ({"schedule": "window", "start": 5, "stop": 5}, ValueError, "start must be < stop"),
        ({"schedule": "uniform", "center": 10}, ValueError, "center= does not apply to schedule 'uniform'"),
        ({"schedule": "window", "full_steps": [1]}, ValueError, "takes start, stop"),
    ],
)
def test_bad_fields_name_the_value_and_the_choices(kwargs, error, match):
    with pytest.raises(error, match=match):
        DeepCacheConfig(**kwargs)


def test_non_uniform_defaults_are_the_papers():
    cfg = DeepCacheConfig(interval=5, schedule="non-uniform")
    assert (cfg.center, cfg.power) == (15, 1.4)


def test_json_round_trip(tmp_path):
    cfg = DeepCacheConfig(branch=2, interval=4, schedule="window", start=3, stop=40)
    cfg.save(tmp_path / "c.json")
    assert DeepCacheConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown DeepCacheConfig field"):
        DeepCacheConfig.from_dict({"branch": 0, "intervall": 3})
