"""Aliases: conversions that return their input unchanged, replaced by that input.

``x.float()`` on a float32 tensor returns ``x`` itself, and ``torch.export`` (non-strict) then
traces every later use of ``x`` as a use of the conversion's node. The latent-diffusion
``GroupNorm32`` does that to the skip tensors it normalises: the skip of the first output
block is read through a ``to`` node inside the middle block, which would keep a node of the
deep part alive in a shallow graph. The value is the same tensor, so the uses go back to it.
"""

from __future__ import annotations

import torch
from torch import fx

_CONVERSIONS = (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device)


def _is_alias(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CONVERSIONS or not isinstance(node.args[0], fx.Node):
        return False
    if node.kwargs.get("copy") or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    same = (src.dtype, src.device, src.layout, src.shape) == (out.dtype, out.device, out.layout, out.shape)
    return same and src.stride() == out.stride()


def drop_alias_conversions(gm: fx.GraphModule) -> fx.GraphModule:
    """Returns ``gm`` with every conversion that returns its own input replaced by that input."""
    for node in list(gm.graph.nodes):
        if _is_alias(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
