"""drop_alias_conversions: a conversion that returns its own input stands for that input no more."""

import torch
from torch import nn

from dcfx.models import ModelSpec
from dcfx.passes import capture


class Normed(nn.Module):
    """GroupNorm32's pattern: ``x.float()`` on a float32 x, then x used again elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).type(x.dtype)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.deep = Normed()

    def forward(self, sample, timestep, return_dict=False):
        skip = sample * timestep[:, None, None, None]
        h = self.deep(skip)
        # A real conversion (float32 -> float64 and back) must stay.
        return (torch.cat([h, skip], dim=1).double().float(),)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_alias_conversions_go_real_ones_stay():
    model = Model().eval()
    inputs = (torch.randn(2, 4, 4, 4), torch.full((2,), 0.5))
    gm = capture(model, ("sample", "timestep"), inputs, spec=ModelSpec(Model))
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    skip = cat.args[0][1]
    # Traced as is, the cat would read the skip through the `to` node inside `deep`.
    assert skip.target is torch.ops.aten.mul.Tensor
    conversions = [n for n in gm.graph.nodes if n.target is torch.ops.aten.to.dtype]
    assert [n.args[1] for n in conversions] == [torch.float64, torch.float32]
    torch.testing.assert_close(gm(*inputs), model(*inputs)[0], atol=0, rtol=0)
