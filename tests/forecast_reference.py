"""A plain eager DeepCache, reuse and forecast, over a diffusers U-Net's own modules: the tests' reference.

It does not cut any graph. Every call runs the whole U-Net; a forward pre-hook on the cached
branch's up resnet sees that layer's input ``cat([hidden, skip])``. On a full step it keeps
``hidden`` (the cache feature); on a shallow step it replaces ``hidden`` with the cached feature
(reuse) or with ``f1 + c (f1 - f0)``, c = (s - s1) / (s1 - s0) clamped to at most 1, from the
last two full steps at distinct positions s0, s1 (forecast). The layers above the branch then
compute exactly what DeepCache's shallow step computes; the deep layers' work is thrown away.

Positions are the timesteps. Step i of a generation is full when ``full(i)``; a full step at
the position of the newest anchor replaces it (repeated timesteps).

``DeepCacheReference.generate`` runs its own denoising loop on a bare U-Net.
``PipelineReference`` runs inside a real diffusers pipeline: a forward pre-hook on the U-Net
itself counts the generation's calls and reads each call's timestep, so the pipeline's own loop
(guidance, img2img's late start, ControlNet residuals, video frames) drives it. The layer is
found by DeepCache's numbering of the up resnets (branch 0: the last one), and the width of
``hidden`` from the skip that the up block hands that resnet: nothing of dcfx's graph cut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dcfx.config import DeepCacheConfig
from dcfx.schedule import StepPlan, plan


class DeepCacheReference:
    """Runs ``unet`` as DeepCache would, at the up resnet ``layer`` (its input channels: hidden then skip)."""

    def __init__(self, unet: nn.Module, layer: nn.Module, hidden_channels: int | None, forecast: bool) -> None:
        self.unet = unet
        self.channels = hidden_channels
        self.forecast = forecast
        self.anchors: list[tuple[float, torch.Tensor]] = []  # (position, feature), oldest first, at most 2
        self.mode: tuple[str, float] = ("full", 0.0)
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        x, *rest = args
        kind, position = self.mode
        channels = self._hidden_channels(x)
        hidden, skip = x[:, :channels], x[:, channels:]
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

    def _hidden_channels(self, x: torch.Tensor) -> int:
        """Returns how many of the layer input's channels are ``hidden`` (the rest: the skip)."""
        assert self.channels is not None
        return self.channels

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


def cached_layer(unet: nn.Module, branch: int) -> tuple[nn.Module, int]:
    """Returns the up block holding branch ``branch``'s cached layer and the layer's index in its resnets.

    DeepCache's numbering: branch 0 is the last up resnet, then the one before it, up the
    blocks to the first one.
    """
    layers = [(block, i) for block in reversed(unet.up_blocks) for i in reversed(range(len(block.resnets)))]
    if branch >= len(layers):
        raise ValueError(f"branch {branch}: the U-Net has {len(layers)} up resnets")
    return layers[branch]


class PipelineReference(DeepCacheReference):
    """``DeepCacheReference`` driven by a pipeline's own U-Net calls, with ``config``'s branch and schedule.

    A forward pre-hook on the U-Net reads each call's timestep (its first entry; the second
    positional argument or ``timestep=``). The first call after ``scheduler.timesteps`` became a
    new tensor (``set_timesteps`` ran: every pipeline call does) starts a generation: no anchors,
    step 0, and a step plan for the entries of ``scheduler.timesteps`` from that call's timestep
    on (img2img starts late: its steps count from the first executed call). Every later call is
    the next step. Step 0 is full, and step i when the plan says so.

    ``calls`` lists every call's ``(kind, position)``, kind "full" or "shallow".
    ``remove()`` takes the hooks off.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, config: DeepCacheConfig) -> None:
        if config.forecast not in ("none", "linear"):
            raise ValueError(f"the reference knows forecast 'none' and 'linear', not {config.forecast!r}")
        block, index = cached_layer(unet, config.branch)
        super().__init__(unet, block.resnets[index], hidden_channels=None, forecast=config.forecast == "linear")
        self.scheduler = scheduler
        self.config = config
        self.calls: list[tuple[str, float]] = []
        self._index = index
        self._skip: int | None = None  # the channels of the skip the cached layer gets
        self._timesteps: torch.Tensor | None = None
        self._plan: StepPlan | None = None
        self._step = 0
        self._handles = [
            self.handle,
            block.register_forward_pre_hook(self._on_block, with_kwargs=True),
            unet.register_forward_pre_hook(self._on_call, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Takes the hooks off the U-Net."""
        for handle in self._handles:
            handle.remove()

    def _on_block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # UNet2DConditionModel and the spatio-temporal U-Net pass the skips by keyword,
        # UNet2DModel positionally; resnet i of the block takes the i-th skip from the end.
        skips = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
        self._skip = skips[-1 - self._index].shape[1]

    def _hidden_channels(self, x: torch.Tensor) -> int:
        assert self._skip is not None, "the up block's hook did not run before its resnet's"
        return x.shape[1] - self._skip

    def _on_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        position = float(torch.as_tensor(timestep).reshape(-1)[0])
        timesteps = self.scheduler.timesteps
        if timesteps is not self._timesteps:
            values = [float(v) for v in timesteps.tolist()]
            self._timesteps = timesteps
            self._plan = plan(self.config, len(values) - values.index(position))
            self._step = 0
            self.anchors = []
        else:
            self._step += 1
        assert self._plan is not None
        full = self._step == 0 or self._plan.is_full(self._step)
        self.mode = ("full" if full else "shallow", position)
        self.calls.append(self.mode)
