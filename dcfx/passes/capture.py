"""Capture: a U-Net call as a flat, positional FX graph, by ``torch.export`` (non-strict)."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

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


def structural_clone(module: nn.Module) -> nn.Module:
    """Returns a copy of ``module``'s tree whose modules are new objects holding the same tensors.

    Captures run on a clone: ``torch.export`` swaps the parameters in the traced modules'
    dicts for fake tensors until it is done, and the capture sets eval mode and, for a LoRA
    scale, the adapters' ``scaling``; on a clone, none of that touches the modules that
    other threads read meanwhile (their steps, their model-change checks). The parameters and
    buffers are the same objects, so the graphs share the model's weights.
    """
    clones: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in clones:
            return clones[id(m)]
        new = copy.copy(m)
        clones[id(m)] = new
        state = new.__dict__
        for key, value in state.items():
            if isinstance(value, (dict, list, set)):
                state[key] = copy.copy(value)  # a container the forward (or the capture) may write to
        state["_modules"] = {k: None if v is None else clone(v) for k, v in m._modules.items()}
        return new

    return clone(module)


@contextlib.contextmanager
def _backend_flags_kept() -> Iterator[None]:
    """Keeps torch.export from switching mkldnn, nnpack and cuDNN off, process-wide, while it traces.

    torch.export turns those backends off for its whole trace (``_ignore_backend_decomps``,
    a private helper of torch.export; checked on torch 2.13): a step running in another
    thread meanwhile would compute its convolutions with other kernels (seen: 1e-6 off per
    call on the CPU; on a GPU, convolutions without cuDNN). The flags only steer which
    kernels run, and the captured graphs were found identical with them kept (ops, shapes and
    strides, tests/passes). Where the helper is missing, nothing is patched.
    """
    import torch.export._trace as trace

    if not hasattr(trace, "_ignore_backend_decomps"):
        yield
        return
    with mock.patch.object(trace, "_ignore_backend_decomps", contextlib.nullcontext):
        yield


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
    # Graphs are inference graphs (dropout off) whatever mode the user's model is in.
    wrapper = FlatUNet(structural_clone(unet).eval(), names, spec)
    shapes = None
    if dynamic_shapes is not None:
        shapes = (tuple(dynamic_shapes.get(n) for n in names),)
    with torch.no_grad(), _backend_flags_kept():
        program = torch.export.export(wrapper, tensors, dynamic_shapes=shapes, strict=False)
        if any(mutates(node) for node in program.graph.nodes):
            # In-place writes to intermediates (FreeU scales half of the channels with
            # hidden[:, :c] = ...) hide data flow from the partition: a use of the written
            # tensor does not depend on the write in the graph. Functionalized (no
            # decompositions), the writes become explicit ops such as slice_scatter.
            program = program.run_decompositions({})
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
