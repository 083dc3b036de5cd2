"""The per-call LoRA scale (``cross_attention_kwargs={"scale": s}``) as a graph input.

diffusers applies a call's LoRA scale by multiplying, before the forward, the ``scaling`` of
every active adapter in every peft tuner layer by ``s``, and dividing it back after. Captured
that way, ``s`` would be a constant of the graph. Instead, while a graph is captured, dcfx
sets each of those ``scaling`` entries to ``scaling * s`` with ``s`` a graph input (a 0-d
float64 tensor, so that the product rounds as diffusers' Python float does), and restores
them afterwards: changing the scale then costs no capture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dcfx.scalars import scalar

SCALE_INPUT = "cross_attention_kwargs.scale"
# The forward arguments that carry a LoRA "scale": U-Nets' cross_attention_kwargs, SD3's and
# Flux's joint_attention_kwargs, other transformers' attention_kwargs. Whichever carries it,
# the graph input is SCALE_INPUT (the name exports record).
ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def scale_tensor(scale: object, device: torch.device) -> torch.Tensor:
    """Returns the LoRA scale ``scale`` as the 0-d float64 tensor a graph takes.

    Raises:
        TypeError: ``scale`` is not a real number.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"cross_attention_kwargs['scale'] must be a real number (the LoRA scale), got {scale!r}")
    return scalar(float(scale), torch.float64, device)


def _tuner_layers(model: nn.Module) -> Iterator[nn.Module]:
    try:
        from diffusers.utils import USE_PEFT_BACKEND
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    if not USE_PEFT_BACKEND:
        return  # diffusers ignores the scale without peft (it warns); so does the graph
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and isinstance(getattr(module, "scaling", None), dict):
            yield module


@contextmanager
def lora_scaled(model: nn.Module, scale: torch.Tensor | None) -> Iterator[None]:
    """Multiplies every active adapter's ``scaling`` by ``scale`` inside the block; restores it after.

    What diffusers' ``scale_lora_layers`` does with a float (peft's ``scale_layer``), with a
    tensor instead, so that a captured graph takes the scale as an input.
    """
    if scale is None:
        yield
        return
    saved: list[tuple[dict[str, object], str, object]] = []
    try:
        for layer in _tuner_layers(model):
            # peft's scale_layer scales the active adapters that have LoRA weights in this layer.
            present = layer.lora_A.keys() if hasattr(layer, "lora_A") else layer.scaling.keys()
            for adapter in layer.active_adapters:
                if adapter in present and adapter in layer.scaling:
                    saved.append((layer.scaling, adapter, layer.scaling[adapter]))
                    layer.scaling[adapter] = layer.scaling[adapter] * scale
        yield
    finally:
        for scaling, adapter, value in saved:
            scaling[adapter] = value
