"""Forecast: the shallow graph that reads a first-order forecast of the cache feature.

``forecast(*inputs, feature, previous, coefficient) -> sample`` runs the shallow graph on
``feature + coefficient * (feature - previous)``: the feature of the last full step moved along
the line through the last two, ``coefficient = (s - s1) / (s1 - s0)`` for a step at position
``s`` after full steps at ``s0`` and ``s1`` (the runtime computes it). The forecast is three
elementwise ops on the feature, formed inside the graph so that every backend and export
carries it (Inductor fuses it into the feature's first consumer).
"""

from __future__ import annotations

import torch
from torch import fx

from dcfx.passes.context import Graphs, PassContext
from dcfx.passes.partition import FEATURE_INPUT

PREVIOUS_INPUT = "cache_previous"
COEFFICIENT_INPUT = "forecast_coefficient"
_aten = torch.ops.aten


def add_forecast(shallow: fx.GraphModule, ctx: PassContext | None = None) -> fx.GraphModule:
    """Returns a copy of ``shallow`` whose feature input is forecast from two features.

    The copy takes two more inputs after the feature: the previous full step's feature (same
    shape) and the coefficient (a 0-d float32 tensor). With coefficient 0 it computes what
    ``shallow`` does, bit for bit (``f + 0 * (f - p)`` is ``f`` for finite features).

    Raises:
        ValueError: ``shallow`` has no feature input (it is not a shallow graph).
    """
    graph = fx.Graph()
    graph.set_codegen(fx.graph.CodeGen())
    env: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(shallow.graph, env)
    feature = next((env[n] for n in shallow.graph.find_nodes(op="placeholder") if n.name == FEATURE_INPUT), None)
    if feature is None:
        raise ValueError(f"the graph has no {FEATURE_INPUT!r} input: add_forecast takes a shallow graph")
    users = list(feature.users)
    with graph.inserting_after(feature):
        previous = graph.placeholder(PREVIOUS_INPUT)
    with graph.inserting_after(previous):
        coefficient = graph.placeholder(COEFFICIENT_INPUT)
    value = feature.meta.get("val")
    previous.meta = dict(feature.meta)
    if isinstance(value, torch.Tensor):
        coefficient.meta = {"val": value.new_empty((), dtype=torch.float32)}
    with graph.inserting_after(coefficient):
        step = graph.call_function(_aten.sub.Tensor, (feature, previous))
    with graph.inserting_after(step):
        moved = graph.call_function(_aten.mul.Tensor, (step, coefficient))
    with graph.inserting_after(moved):
        forecast = graph.call_function(_aten.add.Tensor, (feature, moved))
    for node in (step, moved, forecast):
        node.meta = {k: feature.meta[k] for k in ("val", "nn_module_stack") if k in feature.meta}
    for user in users:
        user.replace_input_with(feature, forecast)
    graph.output(result)
    gm = fx.GraphModule(shallow, graph, class_name="ForecastGraph")
    gm.graph.lint()
    gm.recompile()
    return gm


def forecast(graphs: Graphs, ctx: PassContext) -> Graphs:
    """The pass: with ``ctx.forecast``, adds the forecast graph made from the shallow one."""
    if not ctx.forecast:
        return graphs
    return {**graphs, "forecast": add_forecast(graphs["shallow"], ctx)}
