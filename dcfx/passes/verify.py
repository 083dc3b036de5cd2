"""Verify: the shallow graph holds no node of the deep part it replaces with the cache."""

from __future__ import annotations

from torch import fx

from dcfx.passes.context import Graphs, PassContext
from dcfx.passes.cuts import in_module, module_path


def deep_modules(ctx: PassContext) -> list[str]:
    """Returns the module paths a shallow step must not run: mid block and deeper up layers."""
    return ctx.layer.deep_paths()


def kept_layers(gm: fx.GraphModule, prefix: str, depth: int = 4) -> list[str]:
    """Returns the layers a graph runs, in execution order: ``conv_in``, ``down_blocks.0.resnets.1``...

    ``depth`` is how many parts of a path under a ``*_blocks`` list name a layer
    (``ModelSpec.layer_depth``: 4 for ``up_blocks.1.resnets.0``, 2 for ``output_blocks.5``).
    """
    layers: dict[str, None] = {}
    for node in gm.graph.nodes:
        path = module_path(node, prefix)
        if not path or path == prefix.rstrip("."):
            continue
        parts = path.split(".")
        if parts[0].endswith("_blocks"):
            if len(parts) >= depth:  # glue of a block (its cat, its upsample size) is no layer
                layers.setdefault(".".join(parts[:depth]))
        else:
            layers.setdefault(parts[0])
    return list(layers)


def verify_shallow(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Returns ``gm`` unchanged after checking that no deep-layer node survived.

    Raises:
        RuntimeError: naming the first deep node left, a partitioning bug rather than bad input.
    """
    deep = deep_modules(ctx)
    for node in gm.graph.nodes:
        for path in deep:
            if in_module(node, path, ctx.module_prefix):
                raise RuntimeError(
                    f"branch {ctx.layer.branch}: shallow graph still runs {node.name} of {path}; "
                    f"the cut did not separate the deep part"
                )
    return gm


def verify(graphs: Graphs, ctx: PassContext) -> Graphs:
    """The pass: checks the shallow graph (``verify_shallow``)."""
    verify_shallow(graphs["shallow"], ctx)
    return graphs
