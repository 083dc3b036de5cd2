import pytest

from dcfx import DeepCacheConfig


def test_non_uniform_defaults_are_the_papers():
    cfg = DeepCacheConfig(interval=5, schedule="non-uniform")
    assert (cfg.center, cfg.power) == (15, 1.4)


def test_json_round_trip(tmp_path):
    cfg = DeepCacheConfig(branch=2, interval=4, schedule="window", start=3, stop=40)
    cfg.save(tmp_path / "c.json")
    assert DeepCacheConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown DeepCacheConfig field"):
        DeepCacheConfig.from_dict({"branch": 0, "intervall": 3})
