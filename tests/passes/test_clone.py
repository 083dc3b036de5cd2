"""The capture's copy of a U-Net: forwards set on module instances, hooks, and what they refer to.

Each state is made on the model a user holds, then compiled: the graphs compute what the live
model computes (every step full, and a shallow step fed the full step's cache), the original
modules are left as they were, and nothing reaches outside the copy.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from diffusers.configuration_utils import FrozenDict
from diffusers.hooks import HookRegistry
from diffusers.hooks import ModelHook as DiffusersHook

import dcfx
from dcfx.models import spec_for
from dcfx.passes.clone import Rebinder, structural_clone
from tests.fixtures import UNET_FACTORIES, example_call, tiny_sd

T = 10.0


def _call() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([T, T]), torch.randn(2, 7, 8, generator=g)


class _Shift(ModelHook):
    """An accelerate hook that changes a module's input (a pre_forward that computes)."""

    def pre_forward(self, module, *args, **kwargs):
        return (args[0] + 0.5, *args[1:]), kwargs


class _Scale(DiffusersHook):
    """A stateless diffusers registry hook that changes a module's output."""

    def post_forward(self, module, output):
        return output * 1.5 + 0.1


def _bound_methods(unet):
    # What DeepCacheSDHelper.disable() leaves: every wrapped module's own bound forward on its instance.
    for m in unet.modules():
        m.forward = types.MethodType(type(m).forward, m)


def _partial(unet):
    def twice(module, *args, **kwargs):
        return type(module).forward(module, *args, **kwargs) * 2

    for m in (unet.mid_block, unet.up_blocks[2].resnets[2]):
        m.forward = functools.update_wrapper(functools.partial(twice, m), m.forward)


def _closure(unet):
    def shifted_forward(forward):  # the original bound forward sits in the closure's cell
        def shifted(*args, **kwargs):
            return forward(*args, **kwargs) + 0.25

        return shifted

    for m in (unet.mid_block, unet.up_blocks[2].resnets[2]):
        m.forward = shifted_forward(m.forward)


def _accelerate_hooks(unet):
    add_hook_to_module(unet.up_blocks[2].resnets[1], _Shift())
    add_hook_to_module(unet.mid_block, _Shift())
    # A device map on one device (dispatch_model): inputs moved to the execution device.
    add_hook_to_module(unet, AlignDevicesHook(execution_device="cpu", io_same_device=True))


def _diffusers_registry(unet):
    for m in (unet.mid_block, unet.up_blocks[2].resnets[2]):
        HookRegistry.check_if_exists_or_initialize(m).register_hook(_Scale(), "scale")


def _torch_hooks(unet):
    unet.up_blocks[2].resnets[2].register_forward_hook(lambda m, args, out: out * 0.5)
    unet.mid_block.register_forward_pre_hook(
        lambda m, args, kwargs: ((args[0] * 2, *args[1:]), kwargs), with_kwargs=True
    )
    unet.conv_in.register_forward_pre_hook(lambda m, args: (args[0] - 0.3,))


STATES = {
    "bound methods (DeepCacheSDHelper.disable)": (_bound_methods, False),
    "functools.partial": (_partial, True),
    "closure": (_closure, True),
    "accelerate add_hook_to_module": (_accelerate_hooks, True),
    "diffusers hook registry": (_diffusers_registry, True),
    "forward hooks and pre-hooks": (_torch_hooks, True),
}


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_graphs_compute_what_the_live_model_computes(state):
    make_state, changes_output = STATES[state]
    unet = tiny_sd()
    x, t, e = _call()
    with torch.no_grad():
        plain = unet(x, t, e).sample
        make_state(unet)
        live = unet(x, t, e).sample
    if changes_output:
        assert (live - plain).abs().max() > 1e-2  # the state changes what the model computes
    forwards = {name: m.__dict__.get("forward") for name, m in unet.named_modules()}
    # Two calls at one timestep: a full step, then a shallow step fed its cache (branch 0 is cut
    # in up_blocks.2, where the states above act, and the mid block runs only in the full step).
    runtime = dcfx.compile(unet, branch=0, interval=2, scheduler=SimpleNamespace(timesteps=torch.tensor([T, T])))
    full = runtime(x, t, e).sample
    shallow = runtime(x, t, e).sample
    assert runtime.stats == {"full": 1, "shallow": 1}
    torch.testing.assert_close(full, live, atol=0, rtol=0)
    torch.testing.assert_close(shallow, live, atol=1e-6, rtol=0)
    # The capture worked on a copy: the model's own forwards are the objects they were.
    assert {name: m.__dict__.get("forward") for name, m in unet.named_modules()} == forwards
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, e).sample, live, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(UNET_FACTORIES))
def test_every_layout_after_the_helper_and_a_wrapped_cut_layer(layout):
    # The helper's leftover state on every module, and a partial around the very up layer
    # whose input branch 0 caches: the cut is found and the pair computes the live model.
    unet = UNET_FACTORIES[layout]()
    _bound_methods(unet)
    layer = spec_for(unet).up_layers(unet)[0]
    resnet = unet.get_submodule(layer.path)

    def shifted(module, *args, **kwargs):
        return type(module).forward(module, *args, **kwargs) + 0.1

    resnet.forward = functools.partial(shifted, resnet)
    call = example_call(unet)
    with torch.no_grad():
        live = unet(**call).sample
    t = float(call["timestep"])
    runtime = dcfx.compile(unet, branch=0, interval=2, scheduler=SimpleNamespace(timesteps=torch.tensor([t, t])))
    torch.testing.assert_close(runtime(**call).sample, live, atol=0, rtol=0)
    torch.testing.assert_close(runtime(**call).sample, live, atol=1e-6, rtol=0)
    assert runtime.stats == {"full": 1, "shallow": 1}


def _module_references(value, seen=None):
    """Yields every module reachable from ``value`` through methods, partials, closures, containers, objects."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, (str, bytes, int, float, type(None), torch.Tensor, type)):
        return
    seen.add(id(value))
    if isinstance(value, torch.nn.Module):
        yield value
        return
    if isinstance(value, types.MethodType):
        children = [value.__func__, value.__self__]
    elif isinstance(value, functools.partial):
        children = [value.func, *value.args, *value.keywords.values(), *vars(value).values()]
    elif isinstance(value, types.FunctionType):
        children = [c.cell_contents for c in value.__closure__ or ()] + list(value.__defaults__ or ())
    elif isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        children = list(value)
    elif hasattr(value, "__dict__"):
        children = list(vars(value).values())
    else:
        children = []
    for child in children:
        yield from _module_references(child, seen)


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_copy_refers_to_no_original_module(state):
    unet = tiny_sd()
    STATES[state][0](unet)
    originals = {id(m) for m in unet.modules()}
    copy = structural_clone(unet)
    copies = list(copy.modules())
    assert not originals & {id(m) for m in copies}
    for m in copies:
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers"):
                continue
            assert not [r for r in _module_references(value) if id(r) in originals], key
    assert all(a is b for a, b in zip(copy.parameters(), unet.parameters(), strict=True))


def test_a_forward_that_reaches_the_model_through_a_global_is_refused_by_name():
    unet = tiny_sd()
    block = unet.up_blocks[2]
    REGISTRY["block"] = block

    def through_a_global(*args, **kwargs):
        return type(REGISTRY["block"]).forward(REGISTRY["block"], *args, **kwargs)

    block.forward = through_a_global
    runtime = dcfx.compile(unet, branch=0)
    with pytest.raises(ValueError, match=r"outside the captured copy.*forward of their own: up_blocks\.2\b") as info:
        runtime(*_call())
    assert "cat(" not in str(info.value)  # never the cut's error
    assert runtime.graph_builds == 0
    del block.forward  # what the error says to do; the class's forward runs
    with torch.no_grad():
        torch.testing.assert_close(runtime(*_call()).sample, unet(*_call()).sample, atol=0, rtol=0)


REGISTRY: dict[str, torch.nn.Module] = {}


def test_rebinding_copies_only_what_refers_to_the_tree():
    inside, outside = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    clone = torch.nn.Linear(2, 2)
    rebinder = Rebinder({id(inside): clone})
    plain = {"a": [1, 2.0, "x"], "b": (torch.ones(1), outside)}
    assert rebinder.rebind(plain) is plain  # nothing to rebind: the same object
    holder = SimpleNamespace(module=inside, other=outside, shared=plain)
    new = rebinder.rebind(holder)
    assert new is not holder and new.module is clone and new.other is outside and new.shared is plain
    assert holder.module is inside  # the original is untouched
    # Shared objects stay shared; cycles end.
    holder.again = holder
    pair = rebinder.rebind([holder, holder])
    assert pair[0] is pair[1]


def test_rebinding_reaches_through_wrappers():
    inside, clone = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    rebinder = Rebinder({id(inside): clone})
    frozen = FrozenDict({"m": inside, "n": 1})
    assert rebinder.rebind(frozen)["m"] is clone and frozen["m"] is inside
    assert rebinder.rebind(OrderedDict(m=inside))["m"] is clone
    assert rebinder.rebind(weakref.ref(inside))() is clone
    wrapped = functools.update_wrapper(functools.partial(lambda m, x: m(x), inside), inside.forward)
    new = rebinder.rebind(wrapped)
    assert new.args == (clone,) and new.__wrapped__.__self__ is clone

    def outer():
        def uses(x):
            return inside(x)

        return uses

    closure = outer()
    assert rebinder.rebind(closure).__closure__[0].cell_contents is clone
    assert closure.__closure__[0].cell_contents is inside
