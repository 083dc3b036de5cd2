"""Locate: the nodes of the captured graph where the model is cut (``PassContext.cut``)."""

from __future__ import annotations

from torch import fx

from dcfx.passes.context import Graphs, PassContext


def find_cache_feature(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Records in ``ctx.located`` the nodes of ``gm`` that ``ctx.cut`` reads (a U-Net: the cache feature).

    Raises:
        ValueError: when the cut is not found (an unsupported block), naming it.
    """
    ctx.located = ctx.cut.locate(gm, ctx.module_prefix)
    return gm


def locate(graphs: Graphs, ctx: PassContext) -> Graphs:
    """The pass: finds the cut in ``graphs["captured"]``."""
    find_cache_feature(graphs["captured"], ctx)
    return graphs
