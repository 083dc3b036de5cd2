"""A plain eager DeepCache, reuse and forecast, over a diffusers U-Net's own modules: the tests' reference.

It does not cut any graph. Every call runs the whole U-Net; a forward pre-hook on the cached
branch's up resnet sees that layer's input ``cat([hidden, skip])``. On a full step it keeps
``hidden`` (the cache feature); on a shallow step it replaces ``hidden`` with the cached feature
(reuse) or with ``f1 + c (f1 - f0)``, c = (s - s1) / (s1 - s0) clamped to at most 1, from the
last two full steps at distinct positions s0, s1 (forecast). The layers above the branch then
compute exactly what DeepCache's shallow step computes; the deep layers' work is thrown away.

Positions are the timesteps. Step i of a generation is full when ``full(i)``; a full step at
the position of the newest anchor replaces it (repeated timesteps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class DeepCacheReference:
    """Runs ``unet`` as DeepCache would, at the up resnet ``layer`` (its input channels: hidden then skip)."""

    def __init__(self, unet: nn.Module, layer: nn.Module, hidden_channels: int, forecast: bool) -> None:
        self.unet = unet
        self.channels = hidden_channels
        self.forecast = forecast
        self.anchors: list[tuple[float, torch.Tensor]] = []  # (position, feature), oldest first, at most 2
        self.mode: tuple[str, float] = ("full", 0.0)
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        x, *rest = args
        kind, position = self.mode
        hidden, skip = x[:, : self.channels], x[:, self.channels :]
        if kind == "full":
            feature = hidden.clone()
            if self.anchors and self.anchors[-1][0] == position:
                self.anchors[-1] = (position, feature)
            else:
                self.anchors = [*self.anchors[-1:], (position, feature)]
            return None
        s1, f1 = self.anchors[-1]
        feature = f1
        if self.forecast and len(self.anchors) == 2:
            s0, f0 = self.anchors[0]
            c = min((position - s1) / (s1 - s0), 1.0)
            feature = f1 + torch.tensor(c, dtype=torch.float32) * (f1 - f0)
        return (torch.cat([feature, skip], dim=1), *rest)

    def generate(
        self,
        scheduler,
        call: dict,
        x: torch.Tensor,
        full: Callable[[int], bool],
        steps: int,
    ) -> torch.Tensor:
        """A denoising loop with ``scheduler``; returns the final latents."""
        self.anchors = []
        scheduler.set_timesteps(steps)
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                self.mode = ("full" if full(i) else "shallow", float(t))
                eps = self.unet(**dict(call, sample=x, timestep=t)).sample
                x = scheduler.step(eps, t, x).prev_sample
        return x
