"""Verify: the shallow graph holds no node of the deep part it replaces with the cache."""

from __future__ import annotations

from torch import fx, nn

from dcfx.models import BlockRange
from dcfx.passes.context import Graphs, PassContext
from dcfx.passes.cuts import in_module, module_path, ran_in


def deep_modules(ctx: PassContext) -> list[str]:
    """Returns the module paths a shallow step must not run: mid block and deeper up layers, or the cached blocks."""
    return ctx.layer.deep_paths()


def kept_layers(gm: fx.GraphModule, model: nn.Module, prefix: str, depth: int = 4) -> list[str]:
    """Returns the layers of ``model`` a graph runs, in execution order: ``conv_in``, ``down_blocks.0.resnets.1``...

    ``depth`` is how many parts of a path under a ``*_blocks`` list name a layer
    (``ModelSpec.layer_depth``: 4 for ``up_blocks.1.resnets.0``, 2 for ``output_blocks.5``).
    Only paths of ``model``'s submodules count: nodes torch.export adds after tracing (the
    shape checks of a capture over ranges) may carry a stand-in module stack, such as
    ``_empty_nn_module_stack_from_metadata_hook`` (torch 2.13), that names no module.
    """
    modules = {name for name, _ in model.named_modules()}
    layers: dict[str, None] = {}
    for node in gm.graph.nodes:
        path = module_path(node, prefix)
        if not path or path == prefix.rstrip("."):
            continue
        parts = path.split(".")
        if parts[0].endswith("blocks"):
            layer = ".".join(parts[:depth])
            # Glue of a block (its cat, its upsample size) is no layer, nor a submodule of a layer
            # called from outside it (DiT's head calls block 0's embedding).
            if len(parts) >= depth and ran_in(node, layer, prefix) and layer in modules:
                layers.setdefault(layer)
        elif parts[0] in modules:
            layers.setdefault(parts[0])
    return list(layers)


def verify_shallow(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Returns ``gm`` unchanged after checking that no deep-layer node survived.

    Raises:
        RuntimeError: naming the first deep node left, a partitioning bug rather than bad input.
    """
    deep = deep_modules(ctx)
    # A block range: a node of a cached block counts where the block itself ran it (the head
    # of DiT calls a submodule of block 0 on every step, outside the block's call).
    inside = ran_in if isinstance(ctx.layer, BlockRange) else in_module
    for node in gm.graph.nodes:
        for path in deep:
            if inside(node, path, ctx.module_prefix):
                raise RuntimeError(
                    f"{_name(ctx)}: shallow graph still runs {node.name} of {path}; "
                    f"the cut did not separate the deep part"
                )
    return gm


def verify(graphs: Graphs, ctx: PassContext) -> Graphs:
    """The pass: checks the shallow graph (``verify_shallow``)."""
    verify_shallow(graphs["shallow"], ctx)
    return graphs


def _name(ctx: PassContext) -> str:
    place = ctx.layer
    return place.name if isinstance(place, BlockRange) else f"branch {place.branch}"
