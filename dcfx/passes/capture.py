"""Capture: a U-Net call as a flat, positional FX graph, by ``torch.export`` (non-strict)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from dcfx.models import ModelSpec, spec_for, unflatten
from dcfx.passes.aliases import drop_alias_conversions
from dcfx.passes.cleanup import mutates


class FlatUNet(nn.Module):
    """Calls ``unet`` with tensors only, in the order of ``names``; returns the output sample.

    ``torch.export`` needs a forward of tensors in and tensors out; this one rebuilds the
    keyword arguments (tuples for residuals, dicts for added_cond_kwargs) from the flat list
    and calls the model as its spec says (``ModelSpec.call``).
    """

    def __init__(self, unet: nn.Module, names: tuple[str, ...], spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.names = names
        if spec is None:
            try:
                spec = spec_for(unet)
            except TypeError:  # a model not registered with dcfx (a pass tested on its own): called plainly
                spec = ModelSpec(type(unet))
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Returns the U-Net's output sample for the flat inputs."""
        return self.spec.call(self.unet, unflatten(self.names, tensors))


def capture(
    unet: nn.Module,
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dynamic_shapes: Mapping[str, Any] | None = None,
    spec: ModelSpec | None = None,
) -> fx.GraphModule:
    """Returns the U-Net call as a GraphModule ``f(*tensors) -> sample`` sharing unet's weights.

    The graph is plain positional: the pytree input/output handling that
    ``ExportedProgram.module()`` adds is replaced by the default code generator, and the
    output is the sample tensor itself. ``dynamic_shapes`` maps input names to
    ``torch.export`` dimension specs (``{"sample": {0: Dim("batch")}}``). ``spec`` says how
    to call the model (default: ``spec_for(unet)``).
    """
    wrapper = FlatUNet(unet, names, spec)
    shapes = None
    if dynamic_shapes is not None:
        shapes = (tuple(dynamic_shapes.get(n) for n in names),)
    modes = {m: m.training for m in unet.modules()}
    try:
        # Graphs are inference graphs (dropout off) whatever mode the user's model is in.
        unet.eval()
        with torch.no_grad():
            program = torch.export.export(wrapper, tensors, dynamic_shapes=shapes, strict=False)
        if any(mutates(node) for node in program.graph.nodes):
            # In-place writes to intermediates (FreeU scales half of the channels with
            # hidden[:, :c] = ...) hide data flow from the partition: a use of the written
            # tensor does not depend on the write in the graph. Functionalized (no
            # decompositions), the writes become explicit ops such as slice_scatter.
            program = program.run_decompositions({})
    finally:
        for module, training in modes.items():
            module.training = training
    gm = program.module()
    for node in list(gm.graph.nodes):
        # Recent torch inserts a call to an input-guard submodule; the runtime checks inputs itself.
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    graph = fx.Graph()
    graph.set_codegen(fx.graph.CodeGen())
    env: dict[fx.Node, fx.Node] = {}
    for old, name in zip(gm.graph.find_nodes(op="placeholder"), names, strict=True):
        env[old] = graph.placeholder(re.sub(r"\W", "_", name))
        env[old].meta = dict(old.meta)
    result = graph.graph_copy(gm.graph, env)
    while isinstance(result, (tuple, list)):
        (result,) = result
    graph.output(result)
    return drop_alias_conversions(fx.GraphModule(gm, graph, class_name="CapturedUNet"))
