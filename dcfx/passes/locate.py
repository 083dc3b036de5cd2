"""Locate: the graph node that holds the cache feature of the chosen skip branch."""

from __future__ import annotations

import torch
from torch import fx

from dcfx.passes.context import PassContext


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


def find_cache_feature(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Records in ``ctx.feature`` the main-path input of the branch's up layer.

    In diffusers up blocks each resnet runs on ``cat([hidden, skip], dim=1)``, as does each
    output block of a latent-diffusion ``UNetModel``; the feature is ``hidden``: the output of
    the layer before (or of the previous up block / the mid block).
    The cat is found as the one whose users lie inside the layer's resnet, by
    ``nn_module_stack``, so no node name or block layout is assumed.

    Raises:
        ValueError: when the layer's input is not such a cat (an unsupported up block).
    """
    path = ctx.layer.path
    cats = [
        node
        for node in gm.graph.nodes
        if node.op == "call_function"
        and node.target is torch.ops.aten.cat.default
        and any(in_module(user, path, ctx.module_prefix) for user in node.users)
        and not in_module(node, path, ctx.module_prefix)
    ]
    if len(cats) != 1:
        raise ValueError(
            f"branch {ctx.layer.branch}: expected one cat([hidden, skip]) feeding {path}, found "
            f"{len(cats)}; dcfx supports up blocks that concatenate skip connections (diffusers "
            f"UpBlock2D, CrossAttnUpBlock2D, AttnUpBlock2D and alike; latent-diffusion output_blocks)"
        )
    hidden = cats[0].args[0][0]
    if not isinstance(hidden, fx.Node) or not isinstance(hidden.meta.get("val"), torch.Tensor):
        raise ValueError(f"branch {ctx.layer.branch}: the input of {path} is not a tensor node")
    ctx.feature = hidden.name
    return gm
