"""Partition: the full graph (output and cache feature) and the shallow graph (feature in)."""

from __future__ import annotations

from torch import fx

from dcfx.passes.context import PassContext

FEATURE_INPUT = "cache_feature"


def _copy(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node], fx.Node]:
    graph = fx.Graph()
    graph.set_codegen(fx.graph.CodeGen())
    env: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(gm.graph, env)
    return graph, env, result


def _feature_node(gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    if ctx.feature is None:
        raise RuntimeError("find_cache_feature must run before partitioning")
    return next(n for n in gm.graph.nodes if n.name == ctx.feature)


def build_full(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Returns a graph ``full(*inputs) -> (sample, feature)`` sharing ``gm``'s weights."""
    graph, env, result = _copy(gm)
    graph.output((result, env[_feature_node(gm, ctx)]))
    return fx.GraphModule(gm, graph, class_name="FullGraph")


def build_shallow(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Returns a graph ``shallow(*inputs, feature) -> sample`` sharing ``gm``'s weights.

    The feature node's uses are rewired to a new last placeholder; the deep part that only
    fed it becomes dead and is removed by the cleanup pass that follows.
    """
    graph, env, result = _copy(gm)
    feature = env[_feature_node(gm, ctx)]
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        placeholder = graph.placeholder(FEATURE_INPUT)
    placeholder.meta = {k: feature.meta[k] for k in ("val", "tensor_meta") if k in feature.meta}
    feature.replace_all_uses_with(placeholder)
    graph.output(result)
    return fx.GraphModule(gm, graph, class_name="ShallowGraph")
