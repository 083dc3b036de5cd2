"""Cleanup: dead-code elimination for inference graphs, then lint and recompile."""

from __future__ import annotations

from torch import fx

from dcfx.passes.context import Graphs, PassContext


def mutates(node: fx.Node) -> bool:
    """Returns whether ``node`` calls an ATen op that writes one of its inputs in place."""
    # OpOverload._schema is private but stable across torch 2.6-2.13 (checked on 2.13.0).
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def is_impure_for_inference(node: fx.Node) -> bool:
    """Returns whether DCE must keep ``node`` although nothing uses it.

    The default rule keeps random ops (dropout, SDPA) and metadata asserts, which in an
    inference graph leaves the whole deep part of a U-Net alive. Here only inputs, outputs,
    mutating ops and module calls are impure.
    """
    return node.op in ("placeholder", "output", "call_module") or mutates(node)


def cleanup(gm: fx.GraphModule, ctx: PassContext | None = None) -> fx.GraphModule:
    """Returns ``gm`` without dead nodes or unused submodules, linted and recompiled."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure_for_inference)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def clean(graphs: Graphs, ctx: PassContext) -> Graphs:
    """The pass: every graph without dead nodes or unused submodules."""
    return {name: cleanup(gm, ctx) for name, gm in graphs.items()}
