"""Hooks on a U-Net at capture: traced as the model runs them, cast inside the graph, or refused by name.

Libraries and users change how modules run without changing their classes: a ``forward`` on
the instance, forward hooks and pre-hooks, accelerate's ``ModelHook`` (``_hf_hook``), diffusers'
hook registry (``_diffusers_hook``). A capture runs the model as it is, on a copy of its tree
whose references are bound to the copy (``dcfx.passes.clone``), so hooks that compute are
traced like the rest of the forward. Three kinds are not plain computation:

- diffusers' layerwise casting (``enable_layerwise_casting``) keeps weights in a storage dtype
  and casts them to the compute dtype around each call. ``cast_at_call`` makes the copy do the
  same inside the graph: the graph keeps the stored weights and casts them at every call.
- hooks that move or load weights at call time (accelerate's ``cpu_offload``, ``disk_offload``,
  sequential and model CPU offload; diffusers' group offloading): a compiled graph holds its
  weights in place, so ``check_capturable`` refuses them, naming the hook and what to do.
- diffusers hooks that keep state across calls (its caches, guidance hooks): a graph would
  freeze one call of them; refused by name as well.

Example:
    >>> unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    >>> check_capturable(unet)  # passes: the casts are traced
    >>> accelerate.cpu_offload(unet, execution_device="cpu")
    >>> check_capturable(unet)
    ValueError: up_blocks.0.resnets.0: accelerate offloads this module's weights (AlignDevicesHook ...
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

LAYERWISE_CASTING = "layerwise_casting"
# diffusers' registry names of the hooks that move weights between devices at call time.
_GROUP_OFFLOADING = frozenset({"group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"})
_KEEP_IN_MEMORY = (
    "remove the hooks (accelerate.hooks.remove_hook_from_module(unet, recurse=True), or pipe.remove_all_hooks()), "
    "keep the U-Net on its device (pipe.to('cuda')), then compile; dcfx's graphs hold the weights in place"
)


def check_capturable(model: nn.Module) -> None:
    """Raises ValueError when ``model`` cannot be captured as it runs: weights not in place, or hooks that move them.

    Every other hook is traced as the model runs it (see the module docstring).
    """
    check_hooks(model)
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(
            f"the U-Net's weight {meta} is on the 'meta' device (not loaded: an offloading hook, or a model made "
            "with init_empty_weights / low_cpu_mem_usage and never filled); load the weights, then compile"
        )


def check_hooks(model: nn.Module) -> None:
    """Raises ValueError when a hook on ``model``'s tree moves weights at call time or keeps state across calls."""
    for path, module in model.named_modules(remove_duplicate=True):
        where = path or type(model).__name__
        for hook in _accelerate_hooks(module):
            name = type(hook).__name__
            if name == "CpuOffload":
                raise ValueError(
                    f"{where}: model CPU offload (pipe.enable_model_cpu_offload(), accelerate {name}) moves the U-Net "
                    f"to its device at each call and back afterwards; {_KEEP_IN_MEMORY}"
                )
            if getattr(hook, "offload", False):
                raise ValueError(
                    f"{where}: accelerate offloads this module's weights ({name} with offload=True: cpu_offload, "
                    f"disk_offload or pipe.enable_sequential_cpu_offload()); they stay on 'meta' between calls and "
                    f"are loaded at each call; {_KEEP_IN_MEMORY}"
                )
        for name, hook in _diffusers_hooks(module):
            if name in _GROUP_OFFLOADING:
                raise ValueError(
                    f"{where}: diffusers group offloading ({name}, unet.enable_group_offload(...)) moves weights "
                    "between devices at each call; load the U-Net again without it and keep it on its device "
                    "(pipe.to('cuda')), then compile; dcfx's graphs hold the weights in place"
                )
            if getattr(hook, "_is_stateful", False):
                raise ValueError(
                    f"{where}: the diffusers hook {name!r} ({type(hook).__name__}) keeps state across calls (a cache "
                    "or guidance hook): a compiled graph would freeze one call of it. dcfx does its own caching: "
                    "remove the hook (model.disable_cache() for diffusers' caches, on pipe.unet or pipe.transformer), "
                    "then compile"
                )
            if name == LAYERWISE_CASTING and len(module._diffusers_hook.hooks) > 1:
                others = sorted(set(module._diffusers_hook.hooks) - {name})
                raise ValueError(
                    f"{where}: layerwise casting together with the diffusers hooks {others} on one module is not "
                    "supported; dcfx traces layerwise casting alone"
                )


def cast_at_call(clone: nn.Module) -> None:
    """Makes the layerwise-cast modules of a capture's copy cast their weights inside the graph.

    diffusers' hook casts a module's tensors with ``module.to(compute_dtype)`` before each call
    and back afterwards, which a trace cannot follow (it would swap the parameters of the
    copy). Here each such module of the copy runs its class's forward with its floating-point
    parameters and buffers replaced, for the call, by their casts: the graph reads the
    stored weights and casts them, as the hook does at every call.
    """
    for module in clone.modules():
        hook = dict(_diffusers_hooks(module)).get(LAYERWISE_CASTING)
        if hook is not None:
            module.__dict__["forward"] = functools.partial(_cast_forward, module, hook.compute_dtype)


def _cast_forward(module: nn.Module, dtype: torch.dtype, *args: Any, **kwargs: Any) -> Any:
    # module.to(dtype), as the hook calls it: every floating-point tensor of the subtree.
    own = [d for m in module.modules() for d in (m._parameters, m._buffers)]
    saved = [dict(d) for d in own]
    try:
        for tensors in own:
            for name, tensor in tensors.items():
                if tensor is not None and tensor.is_floating_point():
                    tensors[name] = tensor.to(dtype)
        return type(module).forward(module, *args, **kwargs)
    finally:
        for tensors, before in zip(own, saved, strict=True):
            tensors.update(before)


def _accelerate_hooks(module: nn.Module) -> Iterator[Any]:
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return
    yield from getattr(hook, "hooks", None) or (hook,)  # SequentialHook chains several


def _diffusers_hooks(module: nn.Module) -> Iterator[tuple[str, Any]]:
    registry = module.__dict__.get("_diffusers_hook")
    yield from getattr(registry, "hooks", {}).items()
