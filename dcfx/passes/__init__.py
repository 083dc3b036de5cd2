"""Graph passes: capture -> locate the cache feature -> partition -> cleanup -> verify.

Each pass is a function ``(gm, ctx) -> gm`` in its own module; ``build_graph_pair`` runs them
in order. The passes know nothing of backends or schedules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from dcfx.models import spec_for
from dcfx.passes.capture import capture
from dcfx.passes.cleanup import cleanup
from dcfx.passes.context import PassContext
from dcfx.passes.locate import find_cache_feature
from dcfx.passes.partition import FEATURE_INPUT, build_full, build_shallow
from dcfx.passes.sources import cached_sources, forget_graphs, forget_sources, source_key
from dcfx.passes.verify import kept_layers, verify_shallow

__all__ = ["FEATURE_INPUT", "GraphPair", "PassContext", "build_graph_pair", "capture", "forget_graphs", "partition"]


@dataclass
class GraphPair:
    """The two graphs of one branch, sharing the U-Net's parameters.

    ``full(*inputs) -> (sample, feature)``; ``shallow(*inputs, feature) -> sample``.
    """

    full: fx.GraphModule
    shallow: fx.GraphModule
    feature_shape: tuple[Any, ...]
    feature_dtype: torch.dtype
    kept_layers: list[str]


def partition(captured: fx.GraphModule, ctx: PassContext) -> GraphPair:
    """Returns the full and shallow graphs of ``ctx.layer``'s branch cut out of ``captured``."""
    gm = find_cache_feature(captured, ctx)
    full = cleanup(build_full(gm, ctx), ctx)
    shallow = verify_shallow(cleanup(build_shallow(gm, ctx), ctx), ctx)
    feature = next(n for n in full.graph.nodes if n.name == ctx.feature).meta["val"]
    return GraphPair(
        full=full,
        shallow=shallow,
        feature_shape=tuple(feature.shape),
        feature_dtype=feature.dtype,
        kept_layers=kept_layers(shallow, ctx.module_prefix, ctx.spec.layer_depth),
    )


def build_graph_pair(
    model: nn.Module,
    branch: int,
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dynamic_shapes: Mapping[str, Any] | None = None,
) -> GraphPair:
    """Returns the graph pair of ``branch`` for calls shaped like ``tensors``.

    Example:
        >>> (names, tensors), _ = spec_for(unet).flatten(unet, (x, t, ehs), {})
        >>> pair = build_graph_pair(unet, 0, names, tensors)
        >>> out, feature = pair.full(*tensors)
        >>> torch.equal(pair.shallow(*tensors, feature), out)
        True
    """
    spec = spec_for(model)
    layers = spec.up_layers(model)
    if not 0 <= branch < len(layers):
        raise ValueError(f"branch {branch} is out of range for this model; valid: 0..{len(layers) - 1}")
    ctx = PassContext(model=model, spec=spec, input_names=names, layer=layers[branch])
    before = cached_sources()
    pair = partition(capture(model, names, tensors, dynamic_shapes, spec), ctx)
    # The intermediate graphs are gone; torch.fx would keep their sources for good.
    forget_sources(cached_sources() - before - {source_key(pair.full), source_key(pair.shallow)})
    return pair
