"""Graph passes: capture, then the pass list: locate -> partition -> clean -> verify -> forecast.

Capture (``torch.export``) makes the graph; each pass after it is a function ``(graphs, ctx)
-> graphs`` in its own module, run in order by ``partition`` (``PASSES``). ``graphs`` maps
names to graph modules: ``{"captured"}`` becomes ``{"full", "shallow"}`` and, with
``ctx.forecast``, ``"forecast"``. Where the model is cut is the ``PassContext``'s ``cut``
(``dcfx.passes.cuts``), found from the model spec's module paths. The passes know nothing of
backends or schedules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from dcfx.models import BlockRange, TransformerSpec, UpLayer, spec_for
from dcfx.passes.capture import capture
from dcfx.passes.cleanup import clean
from dcfx.passes.context import Graphs, PassContext
from dcfx.passes.forecast import forecast
from dcfx.passes.locate import locate
from dcfx.passes.partition import FEATURE_INPUT
from dcfx.passes.partition import partition as cut
from dcfx.passes.sources import cached_sources, forget_graphs, forget_sources, source_key
from dcfx.passes.verify import kept_layers, verify

__all__ = [
    "FEATURE_INPUT",
    "PASSES",
    "GraphPair",
    "PassContext",
    "build_graph_pair",
    "capture",
    "forget_graphs",
    "partition",
    "place_of",
]

Pass = Callable[[Graphs, PassContext], Graphs]

# What runs after capture, in order.
PASSES: tuple[Pass, ...] = (locate, cut, clean, verify, forecast)


@dataclass(frozen=True)
class GraphPair:
    """The graphs of one branch, sharing the U-Net's parameters.

    ``full(*inputs) -> (sample, feature)``; ``shallow(*inputs, feature) -> sample``; with
    forecasting, ``forecast(*inputs, feature, previous, coefficient) -> sample``.
    """

    full: fx.GraphModule
    shallow: fx.GraphModule
    feature_shape: tuple[Any, ...]
    feature_dtype: torch.dtype
    kept_layers: list[str]
    forecast: fx.GraphModule | None = None


def partition(captured: fx.GraphModule, ctx: PassContext, passes: tuple[Pass, ...] = PASSES) -> GraphPair:
    """Returns the graphs of ``ctx``'s cut made from ``captured`` by ``passes``."""
    graphs: Graphs = {"captured": captured}
    for run in passes:
        graphs = run(graphs, ctx)
    full, shallow = graphs["full"], graphs["shallow"]
    feature = full.graph.output_node().args[0][1].meta["val"]
    return GraphPair(
        full=full,
        shallow=shallow,
        feature_shape=tuple(feature.shape),
        feature_dtype=feature.dtype,
        kept_layers=kept_layers(shallow, ctx.model, ctx.module_prefix, ctx.spec.layer_depth),
        forecast=graphs.get("forecast"),
    )


def place_of(model: nn.Module, cut: int | tuple[int, int]) -> UpLayer | BlockRange:
    """Returns where ``model`` is cut: U-Net branch ``cut`` (an int), or the block range ``(first, last)``.

    Raises:
        ValueError: a branch or block range out of range for the model, naming the valid ones.
    """
    spec = spec_for(model)
    if isinstance(cut, tuple):
        if not isinstance(spec, TransformerSpec):
            raise ValueError(f"{type(model).__name__} is cut by branch=, not by first= and last=")
        return spec.block_range(model, *cut)
    layers = spec.up_layers(model)
    if not 0 <= cut < len(layers):
        raise ValueError(f"branch {cut} is out of range for this model; valid: 0..{len(layers) - 1}")
    return layers[cut]


def build_graph_pair(
    model: nn.Module,
    branch: int | tuple[int, int],
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dynamic_shapes: Mapping[str, Any] | None = None,
    forecast: bool = False,
) -> GraphPair:
    """Returns the graph pair cut at ``branch`` for calls shaped like ``tensors`` (with the forecast graph).

    ``branch`` is a U-Net's skip branch, or a transformer's ``(first, last)`` (``place_of``).

    Example:
        >>> (names, tensors), _ = spec_for(unet).flatten(unet, (x, t, ehs), {})
        >>> pair = build_graph_pair(unet, 0, names, tensors)
        >>> out, feature = pair.full(*tensors)
        >>> torch.equal(pair.shallow(*tensors, feature), out)
        True
    """
    spec = spec_for(model)
    place = place_of(model, branch)
    ctx = PassContext(model=model, spec=spec, input_names=names, layer=place, forecast=forecast)
    before = cached_sources()
    pair = partition(capture(model, names, tensors, dynamic_shapes, spec, place), ctx)
    # The intermediate graphs are gone; torch.fx would keep their sources for good.
    kept = {source_key(g) for g in (pair.full, pair.shallow, pair.forecast) if g is not None}
    forget_sources(cached_sources() - before - kept)
    return pair
