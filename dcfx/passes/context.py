"""The state that the passes share: what was captured and where it is cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from dcfx.models import BlockRange, ModelSpec, UpLayer
from dcfx.passes.cuts import Cut, cut_for

# The graphs a pass takes and returns, by name: "captured", then "full", "shallow", "forecast".
Graphs = dict[str, fx.GraphModule]


@dataclass
class PassContext:
    """Facts about one capture that the passes read and record.

    Attributes:
        model: The wrapped U-Net (the owner of every parameter).
        spec: Its ``ModelSpec``.
        input_names: The flat graph inputs, in placeholder order.
        layer: Where the model is cut: the up layer whose input is cached (a U-Net's branch),
            or the block range whose residual is (a transformer's ``first``/``last``).
        cut: How the graphs are cut there (default: ``cut_for(layer)``).
        forecast: Whether the forecast graph is made too (``dcfx.passes.forecast``).
        located: The captured graph's nodes the cut reads (set by ``locate``).
        module_prefix: The prefix of the U-Net's module paths in ``nn_module_stack``.
    """

    model: nn.Module
    spec: ModelSpec
    input_names: tuple[str, ...]
    layer: UpLayer | BlockRange
    cut: Cut | None = None
    forecast: bool = False
    located: list[fx.Node] = field(default_factory=list)
    module_prefix: str = "unet."

    def __post_init__(self) -> None:
        if self.cut is None:
            self.cut = cut_for(self.layer)

    @property
    def feature(self) -> fx.Node | None:
        """The cache feature's node in the captured graph (None before ``locate``)."""
        return self.located[0] if self.located else None
