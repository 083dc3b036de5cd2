"""dcfx.compile / enable / disable: the contract and every bad input it can receive."""

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.fixtures import example_call, make_sd_pipeline, run_sd, tiny_sd


@pytest.fixture(scope="module")
def unet():
    return tiny_sd()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"branch": 9}, ValueError, r"branch 9 is out of range .* valid branch ids: 0\.\.8"),
        ({"branch": -1}, ValueError, "branch must be an int >= 0"),
        ({"branch": "0"}, TypeError, "branch must be an int"),
        ({"interval": 0}, ValueError, "interval must be an int >= 1"),
        ({"schedule": "linear"}, ValueError, "valid: uniform, non-uniform"),
        ({"backend": "tensorrt"}, ValueError, "unknown backend 'tensorrt'; registered: eager, inductor"),
        ({"backend": "eager", "mode": "max-autotune"}, TypeError, "backend 'eager' got unknown option"),
        ({"backend": "inductor", "fullgraph": False}, TypeError, "it takes: mode, options"),
        ({"schedule": "non-uniform"}, ValueError, "needs the step count: pass scheduler="),
        ({"config": dcfx.DeepCacheConfig(), "interval": 3}, TypeError, "either a DeepCacheConfig or its fields"),
        ({"config": {"branch": 0}}, TypeError, "config must be a DeepCacheConfig or a path"),
    ],
)
def test_bad_input_is_rejected_at_compile(unet, kwargs, error, match):
    config = kwargs.pop("config", None)
    with pytest.raises(error, match=match):
        dcfx.compile(unet, config, **kwargs)


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(TypeError, match=r"does not support Linear.*Supported: UNet2DConditionModel, UNet2DModel"):
        dcfx.compile(torch.nn.Linear(2, 2))


def test_compiling_twice_is_an_error(unet):
    with pytest.raises(TypeError, match="already compiled"):
        dcfx.compile(dcfx.compile(unet))


def test_bad_call_arguments(unet):
    fast = dcfx.compile(unet)
    call = example_call(unet)
    with pytest.raises(TypeError, match=r"sample must be a torch\.Tensor"):
        fast(call["sample"].numpy(), 10, call["encoder_hidden_states"])
    with pytest.raises(TypeError, match="cannot pass cross_attention_kwargs"):
        fast(**call, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \(2,\)"):
        fast(call["sample"], torch.tensor([1, 2, 3]), call["encoder_hidden_states"])
    with pytest.raises(TypeError, match="timestep must be a tensor, int or float"):
        fast(call["sample"], "10", call["encoder_hidden_states"])


def test_config_from_a_json_path(unet, tmp_path):
    dcfx.DeepCacheConfig(branch=4, interval=2).save(tmp_path / "dc.json")
    fast = dcfx.compile(unet, tmp_path / "dc.json")
    assert fast.deepcache_config == dcfx.DeepCacheConfig(branch=4, interval=2)


def test_enable_and_disable_a_pipeline():
    pipe = make_sd_pipeline()
    original = pipe.unet
    plain = run_sd(pipe, steps=4)
    dcfx.enable(pipe, branch=0, interval=2)
    assert isinstance(pipe.unet, dcfx.DeepCacheUNet) and pipe.unet.scheduler is pipe.scheduler
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
