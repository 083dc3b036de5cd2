"""A hand-built micro U-Net in the diffusers layout: structure tests read its graphs by eye."""

from __future__ import annotations

import torch
from torch import nn

from dcfx.models import ModelSpec
from dcfx.passes import PassContext, capture


class Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + temb[:, : self.conv.out_channels, None, None])


class Down(nn.Module):
    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([Res(cin, cout)])
        self.downsamplers = nn.ModuleList([nn.Conv2d(cout, cout, 3, stride=2, padding=1)]) if downsample else None

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        skips = (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class Up(nn.Module):
    def __init__(self, cin: int, skips: tuple[int, ...], cout: int, upsample: bool) -> None:
        super().__init__()
        chans = [cin, cout]
        self.resnets = nn.ModuleList([Res(chans[min(i, 1)] + s, cout) for i, s in enumerate(skips)])
        self.upsample = upsample

    def forward(self, x, skips, temb):
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips[-1]], dim=1), temb)
            skips = skips[:-1]
        if self.upsample:
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return x


class MicroUNet(nn.Module):
    """conv_in -> down(4->4, /2) -> down(4->8) -> mid -> up(8) -> up(4) -> conv_out, 2 layers per up block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(2, 4, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.down_blocks = nn.ModuleList([Down(4, 4, True), Down(4, 8, False)])
        self.mid_block = Res(8, 8)
        self.up_blocks = nn.ModuleList([Up(8, (8, 4), 8, True), Up(8, (4, 4), 4, False)])
        self.conv_out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, sample, timestep, return_dict=False):
        temb = self.time(timestep[:, None])
        x = self.conv_in(sample)
        skips = (x,)
        for block in self.down_blocks:
            x, s = block(x, temb)
            skips += s
        x = self.mid_block(x, temb)
        for block in self.up_blocks:
            n = len(block.resnets)
            x = block(x, skips[-n:], temb)
            skips = skips[:-n]
        return (self.conv_out(x),)


def micro_context(branch: int) -> tuple[nn.Module, PassContext, tuple[torch.Tensor, ...], torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = MicroUNet().eval()
    spec = ModelSpec(MicroUNet)
    layer = spec.up_layers(model)[branch]
    inputs = (torch.randn(2, 2, 8, 8), torch.full((2,), 3.0))
    names = ("sample", "timestep")
    ctx = PassContext(model=model, spec=spec, input_names=names, layer=layer)
    return model, ctx, inputs, capture(model, names, inputs, spec=spec)
