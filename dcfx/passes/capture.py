"""Capture: a U-Net call as a flat, positional FX graph, by ``torch.export`` (non-strict)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import torch
from torch import fx, nn

from dcfx.hooks import cast_at_call, check_capturable
from dcfx.models import BlockRange, ModelSpec, UpLayer, spec_for, unflatten
from dcfx.passes.aliases import drop_alias_conversions
from dcfx.passes.cleanup import mutates
from dcfx.passes.clone import structural_clone
from dcfx.passes.marks import marked


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
    place: UpLayer | BlockRange | None = None,
) -> fx.GraphModule:
    """Returns the U-Net call as a GraphModule ``f(*tensors) -> sample`` sharing unet's weights.

    The graph is plain positional: the pytree input/output handling that
    ``ExportedProgram.module()`` adds is replaced by the default code generator, and the
    output is the sample tensor itself. ``dynamic_shapes`` maps input names to
    ``torch.export`` dimension specs (``{"sample": {0: Dim("batch")}}``). ``spec`` says how
    to call the model (default: ``spec_for(unet)``). A transformer's block range ``place``
    leaves the marks its cut reads (``dcfx.passes.marks``).
    """
    check_capturable(unet)
    # Graphs are inference graphs (dropout off) whatever mode the user's model is in.
    clone = structural_clone(unet).eval()
    cast_at_call(clone)
    wrapper = FlatUNet(clone, names, spec)
    shapes = None
    if dynamic_shapes is not None:
        shapes = (tuple(dynamic_shapes.get(n) for n in names),)
    # A capture over ranges lets torch.export switch those backends off, as it means to: with
    # mkldnn on, a convolution's fake kernel picks its backend by the batch size (>= 16 or
    # not) and the guard would split a range that crosses 16. Steps in other threads during
    # such a capture (an export, a ranged build) may then take other kernels (~1e-6).
    kept = _backend_flags_kept() if dynamic_shapes is None else contextlib.nullcontext()
    marks = marked(clone, place.entry, place.exit) if isinstance(place, BlockRange) else contextlib.nullcontext()
    with torch.no_grad(), kept, marks:
        program = torch.export.export(wrapper, tensors, dynamic_shapes=shapes, strict=False)
        if any(mutates(node) for node in program.graph.nodes):
            # In-place writes to intermediates (FreeU scales half of the channels with
            # hidden[:, :c] = ...) hide data flow from the partition: a use of the written
            # tensor does not depend on the write in the graph. Functionalized (no
            # decompositions), the writes become explicit ops such as slice_scatter.
            program = program.run_decompositions({})
    check_trace_stayed_inside(program, unet)
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


def check_trace_stayed_inside(program: torch.export.ExportedProgram, unet: nn.Module) -> None:
    """Raises ValueError when the trace read the U-Net's weights through modules outside the captured copy.

    The copy's weights are the graph's parameters; a weight the trace reached through an
    original module (a forward or hook that refers to it where ``dcfx.passes.clone`` cannot
    follow, such as a global) comes out as a constant that shares the weight's storage.
    """
    owners: dict[int, str] = {}
    for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
        ptr = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else 0
        if ptr:
            owners.setdefault(ptr, name)
    # Non-persistent buffers (PixArt's positional embedding) are listed among the constants too.
    buffers = set(program.graph_signature.non_persistent_buffers)
    reached = sorted(
        {
            owners[ptr]
            for name, value in program.constants.items()
            if name not in buffers
            and isinstance(value, torch.Tensor)
            and (ptr := value.untyped_storage().data_ptr()) in owners
        }
    )
    if not reached:
        return
    forwards = [path or "(the U-Net)" for path, m in unet.named_modules() if "forward" in m.__dict__]
    shown = ", ".join(reached[:4]) + (f" and {len(reached) - 4} more" if len(reached) > 4 else "")
    raise ValueError(
        f"capture: the U-Net's forward read the weights {shown} through a module object outside the captured "
        "copy of its tree: a forward or hook set on a module refers to the module in a way dcfx cannot follow "
        "(a global, an object it cannot copy). Modules with a forward of their own: "
        f"{', '.join(forwards[:6]) or 'none'}. Refer to the module through the wrapper's arguments "
        "(functools.partial(fn, module), a closure, a bound method), or delete the instance forward "
        "(del module.forward) to run the class's, then compile again"
    )
