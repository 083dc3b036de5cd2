"""dcfx.compile / enable / disable: the contract (bad input: tests/test_bad_input.py)."""

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.fixtures import make_sd_pipeline, run_sd, tiny_sd


@pytest.fixture(scope="module")
def unet():
    return tiny_sd()


def test_config_from_a_json_path(unet, tmp_path):
    dcfx.DeepCacheConfig(branch=4, interval=2).save(tmp_path / "dc.json")
    fast = dcfx.compile(unet, tmp_path / "dc.json")
    assert fast.deepcache_config == dcfx.DeepCacheConfig(branch=4, interval=2)


def test_enable_and_disable_a_pipeline():
    pipe = make_sd_pipeline()
    original = pipe.unet
    plain = run_sd(pipe, steps=4)
    dcfx.enable(pipe, branch=0, interval=2)
    # Bound to the pipeline: it reads the scheduler the pipeline holds at each call.
    assert isinstance(pipe.unet, dcfx.DeepCacheUNet) and pipe.unet.scheduler.current is pipe.scheduler
    cached = run_sd(pipe, steps=4)
    assert pipe.unet.stats == {"full": 2, "shallow": 2}
    dcfx.disable(pipe)
    assert pipe.unet is original
    torch.testing.assert_close(run_sd(pipe, steps=4), plain, atol=0, rtol=0)
    assert not torch.equal(cached, plain)


def test_keywords_and_config_give_the_same_runtime(unet):
    a = dcfx.compile(unet, branch=2, interval=4, schedule="window", start=1, stop=8, scheduler=DDIMScheduler())
    b = dcfx.compile(unet, dcfx.DeepCacheConfig(branch=2, interval=4, schedule="window", start=1, stop=8))
    assert a.deepcache_config == b.deepcache_config
