"""Cut points: where a model is cut, found from the model spec's metadata, not from node names.

A cut names a place in the model by module paths (what the model spec knows), finds its
features in a captured graph by ``nn_module_stack``, and says how the two graphs are made:
what the full graph emits besides the sample, and how the shallow graph takes those
features in place of the part it skips.

- ``SkipCut``: a U-Net skip branch (DeepCache). The feature is the main-path input of an up
  layer, the ``hidden`` of its ``cat([hidden, skip])``; the shallow graph reads it instead.
- A transformer cut (cache-dit's DBCache, see DESIGN.md) fits the same protocol: its
  features are the residuals ``h(after block L - B - 1) - h(before block F)`` per stream,
  which the full graph emits and the shallow graph adds to ``h(before block F)`` in place of
  the blocks it skips.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import fx

from dcfx.models import UpLayer


def module_path(node: fx.Node, prefix: str) -> str:
    """Returns the innermost module path of ``node`` without ``prefix`` ("" outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(prefix) :] if path.startswith(prefix) else path


def in_module(node: fx.Node, path: str, prefix: str) -> bool:
    """Returns whether ``node`` was traced inside the module at ``path`` (or a child of it)."""
    own = module_path(node, prefix)
    return own == path or own.startswith(path + ".")


class Cut(Protocol):
    """Where the graphs are cut (see the module docstring)."""

    def locate(self, gm: fx.GraphModule, prefix: str) -> list[fx.Node]:
        """Returns the nodes of ``gm`` the cut reads (module paths inside ``gm`` start with ``prefix``)."""
        ...

    def emit(self, graph: fx.Graph, located: list[fx.Node]) -> list[fx.Node]:
        """Returns the features the full graph emits besides the sample (nodes of ``graph``)."""
        ...

    def take(self, graph: fx.Graph, located: list[fx.Node], features: list[fx.Node]) -> None:
        """Rewires ``graph`` (a copy) to read the ``features`` placeholders instead of the skipped part."""
        ...


class SkipCut:
    """A U-Net skip branch: the main-path input of ``layer``, read from the cache on shallow steps."""

    def __init__(self, layer: UpLayer) -> None:
        self.layer = layer

    def locate(self, gm: fx.GraphModule, prefix: str) -> list[fx.Node]:
        """Returns ``[hidden]``: the main-path operand of the ``cat([hidden, skip])`` feeding the layer.

        In diffusers up blocks each resnet runs on ``cat([hidden, skip], dim=1)``, as does each
        output block of a latent-diffusion ``UNetModel``. The cat is found as the one whose
        users lie inside the layer's resnet, by ``nn_module_stack``, so no node name or block
        layout is assumed.

        Raises:
            ValueError: when the layer's input is not such a cat (an unsupported up block).
        """
        path = self.layer.path
        cats = [
            node
            for node in gm.graph.nodes
            if node.op == "call_function"
            and node.target is torch.ops.aten.cat.default
            and any(in_module(user, path, prefix) for user in node.users)
            and not in_module(node, path, prefix)
        ]
        if len(cats) != 1:
            raise ValueError(
                f"branch {self.layer.branch}: expected one cat([hidden, skip]) feeding {path}, found "
                f"{len(cats)}; dcfx supports up blocks that concatenate skip connections (diffusers "
                f"UpBlock2D, CrossAttnUpBlock2D, AttnUpBlock2D and alike; latent-diffusion output_blocks)"
            )
        hidden = cats[0].args[0][0]
        if not isinstance(hidden, fx.Node) or not isinstance(hidden.meta.get("val"), torch.Tensor):
            raise ValueError(f"branch {self.layer.branch}: the input of {path} is not a tensor node")
        return [hidden]

    def emit(self, graph: fx.Graph, located: list[fx.Node]) -> list[fx.Node]:
        """The full graph emits the hidden state itself."""
        return list(located)

    def take(self, graph: fx.Graph, located: list[fx.Node], features: list[fx.Node]) -> None:
        """The hidden state's uses read the feature; the deep part that fed it is left dead."""
        for node, feature in zip(located, features, strict=True):
            node.replace_all_uses_with(feature)
