"""Partition: the full graph (output and cache features) and the shallow graph (features in)."""

from __future__ import annotations

from torch import fx

from dcfx.passes.context import Graphs, PassContext

FEATURE_INPUT = "cache_feature"


def feature_input(index: int, count: int) -> str:
    """The name of the shallow graph's ``index``-th feature input (of ``count``)."""
    return FEATURE_INPUT if count == 1 else f"{FEATURE_INPUT}_{index}"


def _copy(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node], fx.Node]:
    graph = fx.Graph()
    graph.set_codegen(fx.graph.CodeGen())
    env: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(gm.graph, env)
    return graph, env, result


def _located(ctx: PassContext) -> list[fx.Node]:
    if not ctx.located:
        raise RuntimeError("locate must run before partitioning")
    return ctx.located


def build_full(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Returns a graph ``full(*inputs) -> (sample, *features)`` sharing ``gm``'s weights."""
    graph, env, result = _copy(gm)
    features = ctx.cut.emit(graph, [env[n] for n in _located(ctx)])
    graph.output((result, *features))
    return fx.GraphModule(gm, graph, class_name="FullGraph")


def build_shallow(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Returns a graph ``shallow(*inputs, *features) -> sample`` sharing ``gm``'s weights.

    The features come in as new last placeholders, which the cut rewires the graph to read;
    the deep part that only fed them becomes dead and is removed by the cleanup pass.
    """
    graph, env, result = _copy(gm)
    located = [env[n] for n in _located(ctx)]
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    features = []
    metas = ctx.cut.feature_meta(located)
    for i, meta in enumerate(metas):
        with graph.inserting_after(last_input):
            last_input = graph.placeholder(feature_input(i, len(metas)))
        last_input.meta = dict(meta)
        features.append(last_input)
    ctx.cut.take(graph, located, features)
    graph.output(result)
    return fx.GraphModule(gm, graph, class_name="ShallowGraph")


def partition(graphs: Graphs, ctx: PassContext) -> Graphs:
    """The pass: the captured graph becomes the full and the shallow graphs."""
    captured = graphs["captured"]
    return {"full": build_full(captured, ctx), "shallow": build_shallow(captured, ctx)}
