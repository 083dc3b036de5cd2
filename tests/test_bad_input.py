"""The bad-input matrix: every misuse is a TypeError or ValueError naming the bad value and
the valid choices, raised at the call that received it, and nothing is lost.

Three tables: what ``DeepCacheConfig`` refuses, what ``dcfx.compile`` refuses, and what a
compiled U-Net's call refuses. A refused call changes nothing: the generation in progress goes
on as if the call had not been made. Exports and loads: tests/export/test_bad_export_input.py.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from tests.fixtures import example_call, tiny_sd
from tests.test_runtime import Recorder

# (fields, error, message pattern)
CONFIG_CASES = [
    ({"branch": -1}, ValueError, "branch must be an int >= 0, got -1"),
    ({"branch": "0"}, TypeError, r"branch must be an int >= 0, got '0' \(str\)"),
    ({"branch": 1.0}, TypeError, r"branch must be an int >= 0, got 1.0 \(float\)"),
    ({"branch": True}, TypeError, r"branch must be an int >= 0, got True \(bool\)"),
    ({"interval": 0}, ValueError, "interval must be an int >= 1, got 0"),
    ({"interval": -2}, ValueError, "interval must be an int >= 1, got -2"),
    ({"interval": 2.5}, TypeError, r"interval must be an int >= 1, got 2.5 \(float\)"),
    ({"interval": None}, TypeError, "interval must be an int >= 1, got None"),
    ({"schedule": "cosine"}, ValueError, "unknown schedule 'cosine'; registered: explicit, non-uniform, uniform"),
    ({"schedule": "non-uniform", "power": 1.0}, ValueError, r"power must be > 1 and <= 10 .* got 1.0"),
    ({"schedule": "non-uniform", "power": 0.5}, ValueError, r"power must be > 1 and <= 10 .* got 0.5"),
    ({"schedule": "non-uniform", "power": float("inf")}, ValueError, "power must be > 1 and <= 10 .* got inf"),
    ({"schedule": "non-uniform", "power": float("nan")}, ValueError, "power must be > 1 and <= 10 .* got nan"),
    ({"schedule": "non-uniform", "power": "x"}, TypeError, "power must be a number > 1, got 'x'"),
    ({"schedule": "non-uniform", "center": -3}, ValueError, "center must be an int >= 0, got -3"),
    ({"schedule": "non-uniform", "center": 2.5}, TypeError, "center must be an int >= 0, got 2.5"),
    (
        {"schedule": "non-uniform", "center": 20, "steps": 20},
        ValueError,
        r"center 20 is outside the 20 steps of the generation \(valid: 0\.\.19\)",
    ),
    ({"schedule": "non-uniform", "steps": 0}, ValueError, "steps must be an int >= 1, got 0"),
    ({"schedule": "explicit"}, TypeError, "schedule='explicit' needs full_steps="),
    ({"schedule": "explicit", "full_steps": [1, -1]}, ValueError, "each of full_steps must be an int >= 0, got -1"),
    ({"schedule": "explicit", "full_steps": "0,3"}, TypeError, "needs full_steps=, a sequence of step indices"),
    ({"schedule": "explicit", "full_steps": [1.5]}, TypeError, r"each of full_steps must be an int >= 0, got 1.5"),
    ({"schedule": "window", "start": 5, "stop": 5}, ValueError, "start must be < stop, got start=5, stop=5"),
    ({"schedule": "window", "start": 7, "stop": 3}, ValueError, "start must be < stop, got start=7, stop=3"),
    ({"schedule": "window", "start": -1}, ValueError, "start must be an int >= 0, got -1"),
    ({"schedule": "uniform", "center": 10}, ValueError, "center= does not apply to schedule 'uniform'; it takes no"),
    ({"schedule": "window", "full_steps": [1]}, ValueError, "full_steps= does not apply .* it takes start, stop"),
]


@pytest.mark.parametrize(("fields", "error", "match"), CONFIG_CASES, ids=lambda v: str(v)[:40])
def test_config_refuses(fields, error, match):
    with pytest.raises(error, match=match):
        dcfx.DeepCacheConfig(**fields)


@pytest.fixture(scope="module")
def unet():
    return tiny_sd()


def _json(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


# (name, arguments of dcfx.compile after the U-Net, error, message pattern)
COMPILE_CASES = [
    ("branch out of range", {"branch": 9}, ValueError, r"branch 9 is out of range .* valid branch ids: 0\.\.8"),
    ("unknown backend", {"backend": "tensorrt"}, ValueError, "unknown backend 'tensorrt'; registered: eager, inductor"),
    ("eager takes no options", {"mode": "max-autotune"}, TypeError, "backend 'eager' got unknown option"),
    ("unknown inductor option", {"backend": "inductor", "fullgraph": False}, TypeError, "it takes: mode, options"),
    ("non-uniform, no step count", {"schedule": "non-uniform"}, ValueError, "needs the step count: pass scheduler="),
    (
        "non-uniform, no solution",
        {"schedule": "non-uniform", "steps": 10, "interval": 2, "center": 5},
        ValueError,
        r"no power > 1 gives the requested number of full steps \(steps=10, interval=2, center=5",
    ),
    ("config and fields", {"config": dcfx.DeepCacheConfig(), "interval": 3}, TypeError, "either a DeepCacheConfig"),
    ("config of the wrong type", {"config": {"branch": 0}}, TypeError, "config must be a DeepCacheConfig or a path"),
    (
        "config JSON with an unknown field",
        {"config_json": {"brnch": 1}},
        ValueError,
        r"unknown DeepCacheConfig field\(s\) \['brnch'\]; valid: \['branch'",
    ),
    ("config JSON not an object", {"config_json": [0, 3]}, ValueError, "expected a JSON object of DeepCacheConfig"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_refuses(unet, tmp_path, name, kwargs, error, match):
    kwargs = dict(kwargs)
    config = kwargs.pop("config", None)
    if "config_json" in kwargs:
        config = _json(tmp_path, kwargs.pop("config_json"))
    with pytest.raises(error, match=match):
        dcfx.compile(unet, config, **kwargs)


def test_compile_refuses_what_is_not_a_unet(unet):
    with pytest.raises(TypeError, match=r"does not support Linear.*Supported: UNet2DConditionModel, UNet2DModel"):
        dcfx.compile(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"already compiled by dcfx; pass the original \(runtime.model\)"):
        dcfx.compile(dcfx.compile(unet))


@dataclass
class Call:
    """One U-Net call's arguments, built from the module's standard call."""

    args: tuple
    kwargs: dict


def _call(change):
    def make(base):
        kwargs = {"sample": base["sample"], "timestep": 800, "encoder_hidden_states": base["encoder_hidden_states"]}
        kwargs.update(change(base))
        return Call((), kwargs)

    return make


# (name, the bad call from the standard one, error, message pattern)
CALL_CASES = [
    (
        "sample not a tensor",
        _call(lambda b: {"sample": b["sample"].numpy()}),
        TypeError,
        "sample must be a torch.Tensor",
    ),
    (
        "sample of rank 3",
        _call(lambda b: {"sample": b["sample"][0]}),
        ValueError,
        r"sample shape must be \(batch, 4, height, width\) for UNet2DConditionModel, got \(4, 16, 16\)",
    ),
    (
        "sample with 3 channels",
        _call(lambda b: {"sample": b["sample"][:, :3]}),
        ValueError,
        r"sample shape must be \(batch, 4, height, width\) .* got \(2, 3, 16, 16\)",
    ),
    (
        "integer sample",
        _call(lambda b: {"sample": b["sample"].long()}),
        TypeError,
        r"sample must be a floating-point tensor \(torch.float32 for this model\), got torch.int64",
    ),
    (
        "sample in another dtype than the weights",
        _call(lambda b: {"sample": b["sample"].double(), "encoder_hidden_states": b["encoder_hidden_states"].double()}),
        TypeError,
        r"sample has dtype torch.float64, the U-Net's weights torch.float32: cast the inputs, or the model",
    ),
    (
        "empty batch",
        _call(lambda b: {"sample": b["sample"][:0], "encoder_hidden_states": b["encoder_hidden_states"][:0]}),
        ValueError,
        r"sample must have a batch dimension of size >= 1, got shape \(0, 4, 16, 16\)",
    ),
    (
        "encoder_hidden_states of another batch",
        _call(lambda b: {"encoder_hidden_states": torch.cat([b["encoder_hidden_states"]] * 2)[:3]}),
        ValueError,
        r"encoder_hidden_states has batch size 3 \(shape \(3, 7, 8\)\), the sample 2",
    ),
    (
        "encoder_hidden_states of another width",
        _call(lambda b: {"encoder_hidden_states": torch.randn(2, 7, 5)}),
        ValueError,
        r"encoder_hidden_states must have shape \(batch, tokens, 8\), got \(2, 7, 5\)",
    ),
    (
        "encoder_hidden_states of rank 2",
        _call(lambda b: {"encoder_hidden_states": torch.randn(2, 8)}),
        ValueError,
        r"encoder_hidden_states must have shape \(batch, tokens, 8\), got \(2, 8\)",
    ),
    (
        "timestep of another batch",
        _call(lambda b: {"timestep": torch.tensor([1, 2, 3])}),
        ValueError,
        r"timestep must be a scalar or have shape \(2,\) to match the batch, got shape \(3,\)",
    ),
    (
        "timestep of rank 2",
        _call(lambda b: {"timestep": torch.ones(2, 1)}),
        ValueError,
        r"timestep must be a scalar or have shape \(2,\) .* got shape \(2, 1\)",
    ),
    ("timestep a string", _call(lambda b: {"timestep": "10"}), TypeError, "timestep must be a tensor, int or float"),
    (
        "timestep complex",
        _call(lambda b: {"timestep": torch.tensor(1 + 2j)}),
        TypeError,
        "timestep must hold real numbers, got a torch.complex64 tensor",
    ),
    (
        "an argument no graph can take",
        _call(lambda b: {"cross_attention_kwargs": {"mask_mode": "soft"}}),
        TypeError,
        r"cannot pass cross_attention_kwargs.mask_mode='soft' into a captured graph: only tensors",
    ),
    (
        "a LoRA scale that is not a number",
        _call(lambda b: {"cross_attention_kwargs": {"scale": "high"}}),
        TypeError,
        r"cross_attention_kwargs\['scale'\] must be a real number \(the LoRA scale\), got 'high'",
    ),
    (
        "an unknown argument",
        _call(lambda b: {"guidance": torch.ones(2)}),
        TypeError,
        "UNet2DConditionModel.forward: got an unexpected keyword argument 'guidance'",
    ),
    (
        "a missing argument",
        lambda b: Call((b["sample"], 800), {}),
        TypeError,
        "UNet2DConditionModel.forward: missing a required argument: 'encoder_hidden_states'",
    ),
]


@pytest.fixture(scope="module")
def generation(unet):
    """A runtime at 1:3 and the two steps of a generation, run once without interruption."""
    fast = dcfx.compile(unet, branch=0, interval=3)
    base = example_call(unet)
    steps = [{**base, "timestep": t} for t in (900, 800)]
    want = [fast(**s).sample for s in steps]
    assert fast.stats == {"full": 1, "shallow": 1}
    return fast, base, steps, want


@pytest.mark.parametrize(("name", "make", "error", "match"), CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_a_bad_call_is_refused_and_changes_nothing(generation, name, make, error, match):
    fast, base, steps, want = generation
    fast.reset()
    fast.stats.update(full=0, shallow=0)
    torch.testing.assert_close(fast(**steps[0]).sample, want[0], atol=0, rtol=0)
    call = make(base)
    with pytest.raises(error, match=match):
        fast(*call.args, **call.kwargs)
    # The generation goes on: the next step is the shallow step it would have been.
    torch.testing.assert_close(fast(**steps[1]).sample, want[1], atol=0, rtol=0)
    assert fast.stats == {"full": 1, "shallow": 1}


def test_a_timestep_outside_the_scheduler_is_counted_by_call_and_said(unet, caplog):
    # Another scheduler drives the call (a second pipeline sharing this U-Net): the runtime
    # cannot place it in its scheduler's timesteps, so it counts such calls by timestep, as a
    # runtime without a scheduler does, and says so once; the model's output, never an error.
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    fast = dcfx.compile(unet, scheduler=scheduler, interval=3)
    rec = Recorder(fast)
    call = example_call(unet)
    fast(**dict(call, timestep=scheduler.timesteps[0]))
    with caplog.at_level(logging.WARNING, logger="dcfx.steps"):
        outside = fast(**dict(call, timestep=123.5)).sample
        fast(**dict(call, timestep=100.0))  # descends: the same generation, step 1 (shallow)
    assert "timestep 123.5 is not in the runtime's scheduler.timesteps [900.0, 800.0" in caplog.text
    assert caplog.text.count("not in the runtime's scheduler") == 1
    with torch.no_grad():
        torch.testing.assert_close(outside, unet(**dict(call, timestep=123.5)).sample, atol=0, rtol=0)  # a full step
    assert fast.stats == {"full": 2, "shallow": 1}
    # Once the scheduler sets its timesteps again, its calls are placed by them.
    scheduler.set_timesteps(10)
    rec.calls.clear()
    for t in scheduler.timesteps:
        fast(**dict(call, timestep=t))
    assert rec.full_steps() == [0, 3, 6, 9]


def test_a_generation_the_non_uniform_schedule_cannot_plan_runs_uniform_and_says_so(unet, caplog):
    # The documented fallback: the step count comes from the scheduler (img2img, a reset
    # mid-way); with steps= in the config the same schedule is refused at compile.
    scheduler = DDIMScheduler()
    fast = dcfx.compile(unet, schedule="non-uniform", interval=2, center=5, scheduler=scheduler)
    rec = Recorder(fast)
    call = example_call(unet)
    for steps, reason in ((10, r"no power > 1 .*\(steps=10, interval=2, center=5"), (5, "center 5 is outside the 5")):
        rec.calls.clear()
        caplog.clear()
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            fast(**dict(call, timestep=t))
        assert rec.full_steps() == list(range(0, steps, 2))  # uniform 1:2
        assert re.search(reason + r".* runs the uniform 1:2 schedule", caplog.text)
    rec.calls.clear()
    scheduler.set_timesteps(20)  # a step count with a solution follows the non-uniform plan
    for t in scheduler.timesteps:
        fast(**dict(call, timestep=t))
    assert rec.full_steps() == dcfx.schedule.non_uniform_full_steps(20, 2, 5, 1.4)[0]


@pytest.mark.parametrize("move", ["dtype", "device"])
def test_weights_moved_after_compile_are_named(move):
    unet = tiny_sd()
    fast = dcfx.compile(unet, branch=0, interval=3)
    call = example_call(unet)
    fast(**call)
    if move == "dtype":
        unet.double()
        error, match = TypeError, r"sample has dtype torch.float32, the U-Net's weights torch.float64"
    else:
        unet.to("meta")  # the only other device on a CPU-only machine
        error, match = ValueError, r"sample is on cpu, the U-Net's weights on meta: move the inputs, or the model"
    with pytest.raises(error, match=match):
        fast(**dict(call, timestep=800))
    if move == "dtype":  # inputs that match the moved weights run, as a full step
        moved = {k: v.double() if k != "timestep" else 700 for k, v in call.items()}
        out = fast(**moved).sample
        torch.testing.assert_close(out, unet(**moved).sample, atol=0, rtol=0)
        assert fast.stats == {"full": 2, "shallow": 0}


@pytest.mark.parametrize("size", [15, 18])
def test_sizes_that_are_not_multiples_of_the_down_factor_run_as_in_diffusers(unet, size):
    # The documented fallback: diffusers U-Nets take any size (they pass upsample sizes on),
    # and dcfx's graphs are captured at the size they are called with.
    fast = dcfx.compile(unet, branch=1, interval=2)
    call = example_call(unet, size=size)
    torch.testing.assert_close(fast(**call).sample, unet(**call).sample, atol=0, rtol=0)
    (_, tensors), _ = fast._spec.flatten(unet, (), call)
    pair = next(iter(fast._rt.graphs.pairs.values()))
    out, feature = pair.full(*tensors)
    torch.testing.assert_close(pair.shallow(*tensors, feature), out, atol=0, rtol=0)
