"""The graphs of one cut as ``ExportedProgram``s over named, ranged dimensions.

Every deployment format starts here: the model (a U-Net, or a diffusion transformer) is
captured over the named dimensions (``dcfx.export.axes``), cut into the full and the shallow
graph, the forecast graph is made from the shallow one (``dcfx.passes.forecast``), and each
graph is exported again on its own (ONNX and AOTInductor take an ``ExportedProgram``).
Shapes are recorded as expressions over the dimension names (``TensorSpec``), which is all a
runtime needs to size buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from dcfx.export.axes import (
    UNIT_DIMS,
    Axes,
    call_sizes,
    dynamic_axes,
    export_dims,
    locate,
    named_axes,
    resize_call,
    trace_call,
    trace_size,
    trace_sizes,
)
from dcfx.export.shapes import DIM_NAMES, DimExpr, DimRange, TensorSpec, dtype_name
from dcfx.models import spec_for
from dcfx.passes import FEATURE_INPUT, GraphPair, build_graph_pair
from dcfx.passes.forecast import COEFFICIENT_INPUT, PREVIOUS_INPUT

__all__ = [
    "OUT_SAMPLE",
    "ProgramPair",
    "build_ranged_pair",
    "call_sizes",
    "check_ranged",
    "dynamic_axes",
    "export_programs",
    "resize_call",
    "to_expr",
    "trace_call",
    "trace_size",
    "trace_sizes",
]

logger = logging.getLogger(__name__)

OUT_SAMPLE = "out_sample"
# What a forecast is traced with: any value would do (the coefficient is an input).
_TRACE_COEFFICIENT = 0.5


@dataclass
class ProgramPair:
    """The exported full, shallow and forecast programs and the specs of their inputs and outputs.

    ``full(*inputs) -> (out_sample, cache_feature)``;
    ``shallow(*inputs, cache_feature) -> out_sample``;
    ``forecast(*inputs, cache_feature, cache_previous, forecast_coefficient) -> out_sample``,
    the shallow graph on ``cache_feature + coefficient * (cache_feature - cache_previous)``
    (the coefficient a 0-d float32 tensor). ``dims`` are the ranges the programs accept
    (torch.export may narrow what was asked for). ``graphs`` and ``forecast_graph`` are the
    in-process graphs the programs came from, and ``example`` a call they were traced with:
    formats compare their artifacts against them.
    """

    full: ExportedProgram
    shallow: ExportedProgram
    forecast: ExportedProgram
    inputs: list[TensorSpec]
    full_outputs: list[TensorSpec]
    shallow_outputs: list[TensorSpec]
    feature: TensorSpec
    dims: dict[str, DimRange]
    graphs: GraphPair
    forecast_graph: fx.GraphModule
    example: tuple[torch.Tensor, ...]

    @property
    def shallow_inputs(self) -> list[TensorSpec]:
        """The shallow graph's inputs: the call's inputs and the cache feature."""
        return [*self.inputs, self.feature]

    @property
    def forecast_inputs(self) -> list[TensorSpec]:
        """The forecast graph's inputs: the shallow graph's, the previous feature and the coefficient."""
        previous = replace(self.feature, name=PREVIOUS_INPUT, graph_name=PREVIOUS_INPUT)
        return [*self.shallow_inputs, previous, TensorSpec(COEFFICIENT_INPUT, COEFFICIENT_INPUT, "float32", ())]

    @property
    def forecast_outputs(self) -> list[TensorSpec]:
        """The forecast graph's outputs: the shallow graph's (the sample)."""
        return list(self.shallow_outputs)

    def programs(self) -> dict[str, tuple[ExportedProgram, list[TensorSpec], list[TensorSpec]]]:
        """Returns each graph's program, inputs and outputs by name (``dcfx.export.manifest.GRAPHS``)."""
        return {
            "full": (self.full, self.inputs, self.full_outputs),
            "shallow": (self.shallow, self.shallow_inputs, self.shallow_outputs),
            "forecast": (self.forecast, self.forecast_inputs, self.forecast_outputs),
        }


def export_programs(
    model: nn.Module,
    cut: int | tuple[int, int],
    dims: Mapping[str, DimRange],
    call: Mapping[str, Any],
    on_stage: Callable[[str], None] = lambda stage: None,
) -> ProgramPair:
    """Returns the cut's full, shallow and forecast graphs exported over ``dims``, traced with ``call``.

    Args:
        model: The U-Net or diffusion transformer (in the dtype and on the device of the export).
        cut: A U-Net's skip branch, or a transformer's ``(first, last)`` block range.
        dims: The named ranges (``parse_dims``; a packed-token transformer's ``model_dims``).
        call: Keyword arguments of a model call at the trace sizes; the named dimensions are
            found on its inputs by ``dcfx.export.axes.named_axes``.
        on_stage: Called with the name of each stage as it starts (progress reporting).

    Raises:
        ValueError: a range one graph cannot serve (``build_ranged_pair``).
    """
    spec = spec_for(model)
    (names, tensors), _ = spec.flatten(model, (), dict(call))
    axes = named_axes(model, names, tensors)
    dynamic = dynamic_axes(model, names, tensors, dims)
    graphs = build_ranged_pair(model, cut, names, tensors, dims, forecast=True)
    forecast_graph = graphs.forecast
    symbols = _symbol_names(graphs.full, names, dynamic, axes)
    inputs = [
        _spec(n, ph.name, ph.meta["val"], symbols) for n, ph in zip(names, _placeholders(graphs.full), strict=True)
    ]
    out_sample, out_feature = _outputs(graphs.full)
    full_outputs = [
        _spec(OUT_SAMPLE, OUT_SAMPLE, out_sample, symbols),
        _spec(FEATURE_INPUT, FEATURE_INPUT, out_feature, symbols),
    ]
    feature = full_outputs[1]
    shallow_outputs = [_spec(OUT_SAMPLE, OUT_SAMPLE, _outputs(graphs.shallow)[0], symbols)]

    positional = tuple(dynamic[n] for n in names)
    with torch.no_grad():
        on_stage("export full graph")
        full = torch.export.export(graphs.full, tensors, dynamic_shapes=positional, strict=False)
        example_feature = graphs.full(*tensors)[1]
        feature_axes = _feature_axes(feature, dims)
        on_stage("export shallow graph")
        shallow = torch.export.export(
            graphs.shallow, (*tensors, example_feature), dynamic_shapes=(*positional, feature_axes), strict=False
        )
        on_stage("export forecast graph")
        # The previous feature has the feature's shape and the same dynamic axes.
        coefficient = torch.tensor(_TRACE_COEFFICIENT, dtype=torch.float32, device=example_feature.device)
        forecast = torch.export.export(
            forecast_graph,
            (*tensors, example_feature, example_feature.clone(), coefficient),
            dynamic_shapes=(*positional, feature_axes, feature_axes, None),
            strict=False,
        )
    where = locate(axes, names)
    narrowed = dict(dims)
    for program in (full, shallow, forecast):
        narrowed = _narrow(narrowed, program, where)
    # Every recorded shape must be computable over the whole range (a runtime sizes its buffers so).
    for point in ({n: getattr(d, key) for n, d in narrowed.items()} for key in ("min", "opt", "max")):
        for tensor_spec in (*inputs, *full_outputs, *shallow_outputs):
            tensor_spec.size(point)
    for name, dim in narrowed.items():
        if dim != dims[name]:
            logger.warning(
                "dcfx: torch.export narrowed %s to %s (asked: %s)", name, dim.describe(), dims[name].describe()
            )
    return ProgramPair(
        full=full,
        shallow=shallow,
        forecast=forecast,
        inputs=inputs,
        full_outputs=full_outputs,
        shallow_outputs=shallow_outputs,
        feature=feature,
        dims=narrowed,
        graphs=graphs,
        forecast_graph=forecast_graph,
        example=tensors,
    )


def build_ranged_pair(
    model: nn.Module,
    cut: int | tuple[int, int],
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dims: Mapping[str, DimRange],
    forecast: bool = False,
) -> GraphPair:
    """Returns the graph pair of ``cut`` captured over ``dims`` from a call at the trace sizes (``trace_call``).

    The pair is checked to serve the whole ranges (``check_ranged``). torch.export's own
    constraint violations pass through unchanged (a ranged build narrows the ranges on them).

    Raises:
        ValueError: the model cannot be traced at the trace sizes (DiT takes square latents
            only), or the pair cannot serve the ranges.
    """
    dynamic = dynamic_axes(model, names, tensors, dims)
    try:
        graphs = build_graph_pair(model, cut, names, tensors, dynamic, forecast=forecast)
    except RuntimeError as e:
        if "Constraints violated" in str(e):
            raise
        sizes = call_sizes(model, names, tensors)
        raise ValueError(
            f"{type(model).__name__} could not be traced over the ranges "
            f"({', '.join(f'{n} {d.describe()}' for n, d in dims.items())}) at {sizes}, sizes inside them (kept apart, "
            f"as torch.export needs): {e}. A model that takes only some of these sizes (DiT: square latents) "
            f"needs static ones there"
        ) from e
    check_ranged(model, graphs, names, tensors, dims)
    return graphs


def check_ranged(
    model: nn.Module,
    graphs: GraphPair,
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dims: Mapping[str, DimRange],
) -> None:
    """Raises ValueError where a pair captured over ``dims`` cannot serve them whole.

    torch.export may fix a dynamic size at its traced value without complaint where the model
    special-cases it (diffusers' PatchEmbed, at the model's configured size): every dynamic
    axis of every input must come out symbolic. And a model may derive an output size from
    something the trace fixes (DiT takes its height and width as the square root of its token
    count): the output sample must follow the input's sizes.
    """
    spec = spec_for(model)
    axes = named_axes(model, names, tensors)
    dynamic = dynamic_axes(model, names, tensors, dims)
    for name, node in zip(names, _placeholders(graphs.full), strict=True):
        for axis in dynamic[name] or {}:
            if not isinstance(node.meta["val"].shape[axis], torch.SymInt) or not _symbols(node, axis):
                dim, size = axes[name][axis][0], tensors[names.index(name)].shape[axis]
                raise ValueError(
                    f"torch.export fixed the {dim} of {type(model).__name__}'s {name} at {size}, "
                    f"the size it was traced at (the model special-cases that size): one graph cannot serve "
                    f"{dim} {dims[dim].describe()}; give a static {dim} (shapes= or dynamic= {{{dim!r}: size}})"
                )
    symbols = _symbol_names(graphs.full, names, dynamic, axes)
    at = names.index(spec.sample_input)
    sample = _placeholders(graphs.full)[at].meta["val"]
    out = _outputs(graphs.full)[0]
    for axis, (dim, _) in axes[spec.sample_input].items():
        if dims.get(dim) is None or dims[dim].static:
            continue
        want = to_expr(sample.shape[axis], symbols)
        try:
            got = to_expr(out.shape[axis], symbols) if axis < out.ndim else None
        except ValueError:  # an output size over symbols of no input axis
            got = str(out.shape[axis])
        if got != want:
            raise ValueError(
                f"{type(model).__name__}'s output {dim} does not follow its input's over a range (traced at "
                f"{tuple(tensors[at].shape)}, the output's axis {axis} came out {got}, not {want}): the model "
                f"derives it from something the trace fixes (DiT takes its height and width as the square root "
                f"of its token count), so one graph cannot serve a range of {dim}s; give a static {dim} (shapes= "
                f"or dynamic= {{{dim!r}: size}})"
            )


def _symbols(node: fx.Node, axis: int) -> set[Any]:
    return set(node.meta["val"].shape[axis].node.expr.free_symbols)


def _feature_axes(feature: TensorSpec, dims: Mapping[str, DimRange]) -> dict[int, Any] | None:
    # The feature's shape expressions as torch.export dims: ``a * dim + b`` of one named dim where
    # the expression is linear in one (a U-Net's height/2; a transformer's image_tokens + 7 with
    # a static prompt); else Dim.AUTO (a residual over height*width/4 + tokens tokens), which
    # torch.export ties to the expression it meets.
    torch_dims = export_dims(dims)
    axes: dict[int, Any] = {}
    for axis, expr in enumerate(feature.shape):
        if isinstance(expr, int):
            continue
        value = sympy.sympify(expr)
        axes[axis] = Dim.AUTO
        if len(value.free_symbols) != 1:
            continue
        (symbol,) = value.free_symbols
        name = str(symbol)
        poly = sympy.Poly(value, symbol) if value.is_polynomial(symbol) else None
        if torch_dims.get(name) is None or poly is None or poly.degree() != 1:
            continue
        # The torch dim counts units of the multiple (heights, widths, frames): dim = multiple * units.
        scale = poly.coeff_monomial(symbol) * (dims[name].multiple if name in UNIT_DIMS else 1)
        offset = poly.coeff_monomial(1)
        if scale.is_Integer and offset.is_Integer and scale >= 1:
            derived = int(scale) * torch_dims[name] if scale != 1 else torch_dims[name]
            axes[axis] = derived + int(offset) if offset else derived
    return axes or None


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="placeholder"))


def _outputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    (out,) = gm.graph.find_nodes(op="output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return [v.meta["val"] for v in values]


def _symbol_names(gm: fx.GraphModule, names: tuple[str, ...], dynamic: Mapping[str, Any], axes: Axes) -> dict[str, str]:
    # Which shape symbol of the capture is which named dimension. Every dynamic axis of every
    # input is read: torch.export may give two inputs' batch axes their own symbols.
    symbols: dict[str, str] = {}
    for name, node in zip(names, _placeholders(gm), strict=True):
        for axis in dynamic[name] or {}:
            expr = node.meta["val"].shape[axis]
            if not isinstance(expr, torch.SymInt):
                continue
            expr = expr.node.expr
            if len(expr.free_symbols) != 1:  # fixed by the trace (check_ranged refuses that)
                continue
            (symbol,) = expr.free_symbols
            dim, divisor = axes[name][axis]
            named = dim if divisor == 1 else f"{dim}/{divisor}"
            scale = expr / symbol  # the axis is scale * symbol
            symbols.setdefault(str(symbol), named if scale == 1 else f"({named})/{scale}")
    return symbols


def to_expr(size: Any, symbols: Mapping[str, str]) -> DimExpr:
    """Returns a (symbolic) size as an int or an expression over the dimension names.

    Raises:
        ValueError: for a size that depends on something other than the named dimensions.
    """
    if isinstance(size, int):
        return size
    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.sympify(size)
    if expr.is_Integer:
        return int(expr)
    unknown = {str(s) for s in expr.free_symbols} - set(symbols)
    if unknown:
        raise ValueError(
            f"a shape depends on {sorted(unknown)}, not only on the named dimensions ({', '.join(DIM_NAMES)}): {expr}"
        )
    named = expr.subs(
        {s: sympy.sympify(symbols[str(s)], locals={n: sympy.Symbol(n) for n in DIM_NAMES}) for s in expr.free_symbols}
    )
    return str(sympy.simplify(named))


def _spec(name: str, graph_name: str, value: torch.Tensor, symbols: Mapping[str, str]) -> TensorSpec:
    return TensorSpec(name, graph_name, dtype_name(value.dtype), tuple(to_expr(s, symbols) for s in value.shape))


def _narrow(
    dims: dict[str, DimRange], program: ExportedProgram, where: Mapping[str, tuple[int, int]]
) -> dict[str, DimRange]:
    # The ranges torch.export settled on for the program's named dims (it may raise a minimum).
    user_inputs = [
        n for n in program.graph.find_nodes(op="placeholder") if n.name in program.graph_signature.user_inputs
    ]
    for name, (index, axis) in where.items():
        if name not in dims:
            continue
        size = user_inputs[index].meta["val"].shape[axis]
        if not isinstance(size, torch.SymInt):
            continue
        expr = size.node.expr
        (symbol,) = expr.free_symbols
        scale = int(expr / symbol)
        bounds = program.range_constraints.get(symbol)
        if bounds is None:
            continue
        lo = max(dims[name].min, int(bounds.lower) * scale)
        hi = dims[name].max if not bounds.upper.is_finite else min(dims[name].max, int(bounds.upper) * scale)
        opt = min(max(dims[name].opt, lo), hi)
        dims[name] = replace(dims[name], min=lo, opt=opt, max=hi)
    return dims
