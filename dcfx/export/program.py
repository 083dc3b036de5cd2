"""The graphs of one branch as ``ExportedProgram``s over named, ranged dimensions.

Every deployment format starts here: the U-Net is captured with dynamic batch, height and
width, cut into the full and the shallow graph, the forecast graph is made from the shallow
one (``dcfx.passes.forecast``), and each graph is exported again on its own (ONNX and
AOTInductor take an ``ExportedProgram``). Shapes are recorded as expressions over the
dimension names (``TensorSpec``), which is all a runtime needs to size buffers.
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

from dcfx.export.shapes import DIM_NAMES, DimExpr, DimRange, TensorSpec, dtype_name
from dcfx.models import spec_for
from dcfx.passes import FEATURE_INPUT, GraphPair, build_graph_pair
from dcfx.passes.forecast import COEFFICIENT_INPUT, PREVIOUS_INPUT

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


def trace_size(dim: DimRange) -> int:
    """Returns the size to trace ``dim`` at: ``opt``, moved off 1 unit (export specialises 0/1)."""
    unit = dim.multiple
    if dim.static or dim.opt // unit >= 2:
        return dim.opt
    return min(2 * unit, dim.max) if dim.max // unit >= 2 else dim.opt


def export_programs(
    model: nn.Module,
    branch: int,
    dims: Mapping[str, DimRange],
    call: Mapping[str, Any],
    on_stage: Callable[[str], None] = lambda stage: None,
) -> ProgramPair:
    """Returns the branch's full, shallow and forecast graphs exported over ``dims``, traced with ``call``.

    Args:
        model: The U-Net (in the dtype and on the device of the export).
        branch: The skip branch.
        dims: The batch, height, width (and tokens) ranges (``parse_dims``).
        call: Keyword arguments of a U-Net call at the trace sizes; every input has the batch
            first, and 4-d inputs (the sample, ControlNet residuals) scale with the sample
            (the model's sample input: ``sample``, or ``x`` for a latent-diffusion UNetModel).
        on_stage: Called with the name of each stage as it starts (progress reporting).
    """
    spec = spec_for(model)
    (names, tensors), _ = spec.flatten(model, (), dict(call))
    factor = spec.downsampling_factor(model)
    sample = tensors[names.index(spec.sample_input)]
    torch_dims = export_dims(dims)
    dynamic = dynamic_axes(model, names, tensors, dims)
    graphs = build_graph_pair(model, branch, names, tensors, dynamic, forecast=True)
    forecast_graph = graphs.forecast
    symbols = _symbol_names(graphs.full, names, tensors, dynamic, sample, spec.context_input)
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
        feature_axes = _feature_axes(feature, torch_dims, factor)
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
    at = names.index(spec.sample_input)
    context_at = names.index(spec.context_input) if spec.context_input in names else None
    narrowed = dict(dims)
    for program in (full, shallow, forecast):
        narrowed = _narrow(narrowed, program, at, context_at)
    # Every recorded shape must be computable over the whole range (a runtime sizes its buffers so).
    for point in ({n: getattr(d, key) for n, d in narrowed.items()} for key in ("min", "opt", "max")):
        for spec in (*inputs, *full_outputs, *shallow_outputs):
            spec.size(point)
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


def export_dims(dims: Mapping[str, DimRange]) -> dict[str, Any]:
    """Returns ``torch.export`` dims for the named ranges (None for a static one).

    Heights and widths count in units of their multiple (the downsampling factor), so that
    every traced size stays a multiple of it.
    """
    return {
        name: None
        if dim.static
        else Dim(name if name in ("batch", "tokens") else f"{name}_units", min=_units(dim, 0), max=_units(dim, 1))
        for name, dim in dims.items()
    }


def dynamic_axes(
    model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dims: Mapping[str, DimRange]
) -> dict[str, dict[int, Any] | None]:
    """Returns the ``torch.export`` dynamic axes of each flat input of a call over ``dims``.

    Every input whose first axis is the sample's batch takes the batch; 4-d inputs (the sample,
    ControlNet residuals) take height and width, scaled by their ratio to the sample's; the
    cross-attention states take the tokens on their second axis.
    """
    spec = spec_for(model)
    factor = spec.downsampling_factor(model)
    sample = tensors[names.index(spec.sample_input)]
    torch_dims = export_dims(dims)
    return {
        n: _dynamic_axes(t, sample, torch_dims, factor, n == spec.context_input)
        for n, t in zip(names, tensors, strict=True)
    }


def call_sizes(model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Returns the named sizes of a call: batch, height and width of the sample, tokens of the context."""
    spec = spec_for(model)
    sample = tensors[names.index(spec.sample_input)]
    sizes = {"batch": int(sample.shape[0]), "height": int(sample.shape[-2]), "width": int(sample.shape[-1])}
    if spec.context_input in names:
        context = tensors[names.index(spec.context_input)]
        if context.ndim == 3:
            sizes["tokens"] = int(context.shape[1])
    return sizes


def resize_call(
    model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], sizes: Mapping[str, int]
) -> tuple[torch.Tensor, ...]:
    """Returns the call's inputs at the named ``sizes`` (new random values where a size changes).

    What a capture over dynamic dims is traced with: ``torch.export`` specialises sizes 0
    and 1, so a call of batch 1 cannot be traced for a range that starts at 1 (``trace_size``
    picks sizes that can).
    """
    now = call_sizes(model, names, tensors)
    spec = spec_for(model)
    resized = []
    for name, tensor in zip(names, tensors, strict=True):
        shape = list(tensor.shape)
        if tensor.ndim and shape[0] == now["batch"]:
            shape[0] = sizes["batch"]
        if tensor.ndim == 4:
            for axis, dim in ((2, "height"), (3, "width")):
                ratio = now[dim] // tensor.shape[axis]
                shape[axis] = sizes[dim] // ratio
        if name == spec.context_input and tensor.ndim == 3 and "tokens" in sizes:
            shape[1] = sizes["tokens"]
        if list(tensor.shape) == shape:
            resized.append(tensor)
        elif tensor.dtype.is_floating_point:
            resized.append(torch.randn(shape, dtype=tensor.dtype, device=tensor.device))
        else:
            resized.append(torch.zeros(shape, dtype=tensor.dtype, device=tensor.device))
    return tuple(resized)


def _units(dim: DimRange, upper: int) -> int:
    return (dim.max if upper else dim.min) // dim.multiple


def _dynamic_axes(
    tensor: torch.Tensor, sample: torch.Tensor, torch_dims: Mapping[str, Any], factor: int, context: bool = False
) -> dict[int, Any] | None:
    axes: dict[int, Any] = {}
    if tensor.ndim and tensor.shape[0] == sample.shape[0] and torch_dims["batch"] is not None:
        axes[0] = torch_dims["batch"]
    if context and tensor.ndim == 3 and torch_dims.get("tokens") is not None:
        axes[1] = torch_dims["tokens"]
    if tensor.ndim == 4:
        for axis, name in ((2, "height"), (3, "width")):
            if torch_dims[name] is None:
                continue
            ratio, rest = divmod(sample.shape[axis], tensor.shape[axis])
            if rest or factor % ratio:
                raise ValueError(
                    f"a 4-d input of spatial size {tuple(tensor.shape[2:])} does not scale with the sample "
                    f"{tuple(sample.shape[2:])} by a power of two up to {factor}; export it with a static {name}"
                )
            axes[axis] = (factor // ratio) * torch_dims[name] if factor // ratio > 1 else torch_dims[name]
    return axes or None


def _feature_axes(feature: TensorSpec, torch_dims: Mapping[str, Any], factor: int) -> dict[int, Any] | None:
    # The feature's shape expressions over (batch, height, width) as torch.export dims.
    axes: dict[int, Any] = {}
    for axis, expr in enumerate(feature.shape):
        if isinstance(expr, int):
            continue
        value = sympy.sympify(expr)
        (symbol,) = value.free_symbols
        name = str(symbol)
        if name == "batch":
            axes[axis] = torch_dims["batch"]
            continue
        scale = value / symbol * factor  # height/2 -> factor/2 units
        axes[axis] = int(scale) * torch_dims[name] if scale != 1 else torch_dims[name]
    return axes or None


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="placeholder"))


def _outputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    (out,) = gm.graph.find_nodes(op="output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return [v.meta["val"] for v in values]


def _symbol_names(
    gm: fx.GraphModule,
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dynamic: Mapping[str, Any],
    sample: torch.Tensor,
    context: str | None = None,
) -> dict[str, str]:
    # Which shape symbol of the capture is which named dimension. Every dynamic axis of every
    # input is read: torch.export may give two inputs' batch axes their own symbols.
    symbols: dict[str, str] = {}
    for name, tensor, node in zip(names, tensors, _placeholders(gm), strict=True):
        for axis in dynamic[name] or {}:
            expr = node.meta["val"].shape[axis]
            if not isinstance(expr, torch.SymInt):
                continue
            expr = expr.node.expr
            (symbol,) = expr.free_symbols
            if axis == 0:
                named = "batch"
            elif name == context and axis == 1:
                named = "tokens"
            else:
                dim = "height" if axis == 2 else "width"
                ratio = sample.shape[axis] // tensor.shape[axis]
                named = dim if ratio == 1 else f"{dim}/{ratio}"
            scale = expr / symbol  # the axis is scale * symbol
            symbols.setdefault(str(symbol), named if scale == 1 else f"({named})/{scale}")
    return symbols


def to_expr(size: Any, symbols: Mapping[str, str]) -> DimExpr:
    """Returns a (symbolic) size as an int or an expression over the dimension names.

    Raises:
        ValueError: for a size that depends on something other than batch, height, width and tokens.
    """
    if isinstance(size, int):
        return size
    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.sympify(size)
    if expr.is_Integer:
        return int(expr)
    unknown = {str(s) for s in expr.free_symbols} - set(symbols)
    if unknown:
        raise ValueError(f"a shape depends on {sorted(unknown)}, not only on batch, height, width and tokens: {expr}")
    named = expr.subs(
        {s: sympy.sympify(symbols[str(s)], locals={n: sympy.Symbol(n) for n in DIM_NAMES}) for s in expr.free_symbols}
    )
    return str(sympy.simplify(named))


def _spec(name: str, graph_name: str, value: torch.Tensor, symbols: Mapping[str, str]) -> TensorSpec:
    return TensorSpec(name, graph_name, dtype_name(value.dtype), tuple(to_expr(s, symbols) for s in value.shape))


def _narrow(
    dims: dict[str, DimRange], program: ExportedProgram, sample_at: int, context_at: int | None
) -> dict[str, DimRange]:
    # The ranges torch.export settled on for the program's named dims (it may raise a minimum).
    user_inputs = [
        n for n in program.graph.find_nodes(op="placeholder") if n.name in program.graph_signature.user_inputs
    ]
    sample = user_inputs[sample_at].meta["val"]
    axes = [(sample, 0, "batch"), (sample, 2, "height"), (sample, 3, "width")]
    if context_at is not None and "tokens" in dims:
        axes.append((user_inputs[context_at].meta["val"], 1, "tokens"))
    for value, axis, name in axes:
        size = value.shape[axis]
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
