"""The runtime follows model changes: when it rebuilds, when it need not, what it says, per-call LoRA scales.

The workflows users run (LoRA, FreeU, processors, reloads) in real pipelines are in
tests/pipelines/test_model_changes.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

import dcfx
from dcfx.backends import _BACKENDS, CompiledPair, get_backend, register_backend
from tests.fixtures import example_call, tiny_unet


def lora_unet(seed: int = 0):
    unet = tiny_unet(seed)
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False),
        adapter_name="a",
    )
    return unet


def eager_copied(full, shallow, example_inputs, **options) -> CompiledPair:
    """The eager graphs, declared as a backend that copies the weights (as Inductor's freezing does)."""
    pair = get_backend("eager")(full, shallow, example_inputs)
    return CompiledPair(full=pair.full, shallow=pair.shallow, release=pair.release, follows_values=False)


@pytest.fixture
def copying_backend():
    register_backend("eager-copied")(eager_copied)
    yield "eager-copied"
    _BACKENDS._entries.pop("eager-copied")  # other tests list the registered backends


def test_the_lora_scale_per_call_is_a_graph_input():
    unet = lora_unet()
    runtime = dcfx.compile(unet, branch=0, interval=1)
    call = example_call(unet)
    outputs = {}
    for scale in (1.0, 0.5, 0.0, 2.0, 0.5):
        got = runtime(**call, cross_attention_kwargs={"scale": scale}).sample
        want = unet(**call, cross_attention_kwargs={"scale": scale}).sample
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        outputs[scale] = want
    assert runtime.graph_builds == 1, "a new scale must not cost a capture"
    assert (outputs[0.0] - outputs[2.0]).abs().max() > 1e-3  # the scale matters
    # The model's own LoRA scaling is untouched by the captures.
    assert all(layer.scaling["a"] == 2.0 for layer in unet.modules() if hasattr(layer, "lora_A"))


def test_a_lora_scale_without_adapters_changes_nothing():
    unet = tiny_unet()
    runtime = dcfx.compile(unet, branch=0, interval=1)
    call = example_call(unet)
    got = runtime(**call, cross_attention_kwargs={"scale": 0.3}).sample
    torch.testing.assert_close(got, unet(**call).sample, atol=0, rtol=0)


@pytest.mark.slow
def test_a_thousand_generations_without_changes_rebuild_nothing():
    unet = tiny_unet()
    runtime = dcfx.compile(unet, branch=0, interval=2)
    call = example_call(unet, batch=1)
    for _ in range(1000):
        for t in (900, 500):  # a descending timestep: one generation of two steps
            runtime(**{**call, "timestep": torch.tensor(t)})
    assert runtime.graph_builds == 1
    assert runtime.stats == {"full": 1000, "shallow": 1000}


@pytest.mark.parametrize(("copies", "builds"), [(False, 1), (True, 2)])
def test_weights_written_in_place_rebuild_only_graphs_that_copied_them(copies, builds, request):
    backend = request.getfixturevalue("copying_backend") if copies else "eager"
    unet = tiny_unet()
    runtime = dcfx.compile(unet, branch=0, interval=1, backend=backend)
    call = example_call(unet)
    runtime(**call)
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    runtime.reset()
    torch.testing.assert_close(runtime(**call).sample, unet(**call).sample, atol=0, rtol=0)
    assert runtime.graph_builds == builds


def test_a_change_mid_generation_is_followed_from_the_next_generation():
    unet = tiny_unet()
    runtime = dcfx.compile(unet, branch=0, interval=3)
    call = example_call(unet)
    runtime(**{**call, "timestep": torch.tensor(900)})
    unet.up_blocks[1].b1 = 1.2  # FreeU-style state, mid-generation: the steps in flight keep their graphs
    unet.up_blocks[1].b2 = 1.4
    unet.up_blocks[1].s1 = 0.9
    unet.up_blocks[1].s2 = 0.2
    runtime(**{**call, "timestep": torch.tensor(800)})
    assert runtime.graph_builds == 1
    got = runtime(**{**call, "timestep": torch.tensor(950)}).sample  # a new generation: checked, rebuilt
    assert runtime.graph_builds == 2
    torch.testing.assert_close(got, unet(**{**call, "timestep": torch.tensor(950)}).sample, atol=0, rtol=0)


def test_a_rebuild_that_fails_names_the_change():
    unet = tiny_unet()
    runtime = dcfx.compile(unet, branch=0, interval=1)
    call = example_call(unet)
    runtime(**call)
    # FreeU's factors set to what its forward cannot use (b1 scales the first up block): the capture fails.
    for name, value in {"b1": "strong", "b2": 1.4, "s1": 0.9, "s2": 0.2}.items():
        setattr(unet.up_blocks[0], name, value)
    runtime.reset()
    with pytest.raises(TypeError, match=r"the U-Net changed since its graphs were built \(.*b1: set to 'strong'"):
        runtime(**call)
    unet.up_blocks[0].b1 = 1.2  # repaired: builds and runs
    runtime.reset()
    torch.testing.assert_close(runtime(**call).sample, unet(**call).sample, atol=0, rtol=0)


def test_the_runtime_state_dict_is_the_models():
    unet = tiny_unet()
    runtime = dcfx.compile(unet, branch=0, interval=2)
    runtime(**example_call(unet))
    assert list(runtime.state_dict()) == [f"model.{k}" for k in unet.state_dict()]
    assert len(list(runtime.parameters())) == len(list(unet.parameters()))
