"""Shape ranges of an export: named dimensions, tensor shapes as expressions, input checks.

An export covers a range of batch sizes, heights and widths (in latent pixels). Every tensor
dimension is recorded as an int (static) or an expression over the named dimensions, such as
``"batch"`` or ``"height/2"``. The expressions are evaluated by a small parser of + - * / and
integers (never ``eval``), so a runtime can size buffers and check inputs without torch.export.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch

# What shapes= names (a video transformer's also "frames", latent frames); a transformer on
# packed tokens (Flux) carries heights and widths as one count of image tokens
# (``dcfx.export.axes.model_dims``).
SHAPE_NAMES = ("batch", "height", "width", "tokens")
FRAMES = "frames"
IMAGE_TOKENS = "image_tokens"
DIM_NAMES = (*SHAPE_NAMES, FRAMES, IMAGE_TOKENS)
# A transformer's default prompt lengths: its built-in example's length means nothing, and its
# pipelines pad prompts to fixed lengths (PixArt 120, SD3 77 + 256, Flux 512).
TRANSFORMER_TOKENS = (2, 77, 512)
DimExpr = int | str


@dataclass(frozen=True)
class DimRange:
    """One named dimension: its range, the size engines are tuned for, and its step.

    Heights and widths come in multiples of the U-Net's downsampling factor (8 for SD 1.5):
    any other size would not survive the down and up blocks.
    """

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max, self.multiple)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"dimension {self.name!r}: min, opt, max and multiple must be ints, got {values}")
        if not (1 <= self.min <= self.opt <= self.max and self.multiple >= 1):
            raise ValueError(f"dimension {self.name!r}: need 1 <= min <= opt <= max and multiple >= 1, got {values}")

    @property
    def static(self) -> bool:
        """True when the range holds one size."""
        return self.min == self.max

    def contains(self, value: int) -> bool:
        """True when ``value`` is a size of this range."""
        return self.min <= value <= self.max and value % self.multiple == 0

    def describe(self) -> str:
        """Returns the range in words, e.g. ``16..128 in multiples of 8``."""
        if self.static:
            return f"exactly {self.min}"
        step = f" in multiples of {self.multiple}" if self.multiple > 1 else ""
        return f"{self.min}..{self.max}{step}"

    def to_dict(self) -> dict[str, int]:
        """Returns the range as JSON-able fields (without the name)."""
        return {k: v for k, v in asdict(self).items() if k != "name"}


def default_side_range(sample_size: int, multiple: int) -> tuple[int, int, int]:
    """The default (min, opt, max) of a height or width: half to twice the model's size, on the multiple."""
    return max(multiple, sample_size // 2 // multiple * multiple), sample_size, 2 * sample_size


def parse_dims(
    shapes: Mapping[str, Any] | None,
    sample_size: int,
    multiple: int,
    tokens: int | None = None,
    frames: int | None = None,
    frame_multiple: int = 1,
) -> dict[str, DimRange]:
    """Returns the dimension ranges of an export from the user's ``shapes``.

    Args:
        shapes: ``{"batch": ..., "height": ..., "width": ..., "tokens": ...}``, heights and
            widths in latent pixels, tokens the length of the cross-attention states (the
            prompt: long prompts come as 77 x k tokens), each an int (static), a ``(min, max)``
            or a ``(min, opt, max)``. Missing names take defaults: batch (1, 2, 4), height and
            width (sample_size / 2, sample_size, 2 * sample_size), tokens ``tokens`` (static).
            A ``(min, max)`` range is tuned for batch 2, ``sample_size`` and ``tokens``
            (moved into the range).
        sample_size: The model's default latent size (``unet.config.sample_size``).
        multiple: The model's downsampling factor (a transformer's patch size; Flux's packing):
            heights and widths must be multiples of it.
        tokens: The context length of the model's typical call; None for a model that takes no
            cross-attention states (then ``shapes`` may not name tokens).
        frames: A video model's latent frames in its typical call (the default, static); None
            for an image model (then ``shapes`` may not name frames).
        frame_multiple: What frame counts must be multiples of (a temporal patch size).

    Raises:
        ValueError: for an unknown name, a bad range, or a height/width off the multiple.
    """
    shapes = dict(shapes or {})
    names = SHAPE_NAMES if tokens is not None else SHAPE_NAMES[:3]
    names = (*names, FRAMES) if frames is not None else names
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        why = {"tokens": " (this model takes no cross-attention states)", FRAMES: " (this model takes images)"}
        what = "".join(why.get(name, "") for name in unknown)
        raise ValueError(f"unknown shape name(s) {unknown}{what}; shapes takes {', '.join(names)}")
    defaults: dict[str, Any] = {"batch": (1, 2, 4), "height": default_side_range(sample_size, multiple)}
    defaults["width"] = defaults["height"]
    defaults["tokens"] = tokens
    defaults[FRAMES] = frames
    steps = {"height": multiple, "width": multiple, FRAMES: frame_multiple}
    preferred = {"batch": 2, "height": sample_size, "width": sample_size, "tokens": tokens or 1, FRAMES: frames or 1}
    given = {name: shapes.get(name, defaults[name]) for name in names}
    return {name: _parse_range(name, given[name], steps.get(name, 1), preferred[name]) for name in names}


def _parse_range(name: str, value: Any, multiple: int, preferred: int) -> DimRange:
    if isinstance(value, bool):
        raise ValueError(f"shapes[{name!r}] must be an int or a (min, max) / (min, opt, max) tuple, got {value!r}")
    if isinstance(value, int):
        value = (value, value, value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) not in (2, 3):
        raise ValueError(f"shapes[{name!r}] must be an int or a (min, max) / (min, opt, max) tuple, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"shapes[{name!r}] must hold ints, got {value!r}")
    lo, hi = value[0], value[-1]
    # Without an opt: the model's own size (batch 2), moved into the range onto the multiple.
    opt = value[1] if len(value) == 3 else min(max(lo, preferred // multiple * multiple), hi)
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"shapes[{name!r}] must satisfy 1 <= min <= opt <= max, got {tuple(value)!r}")
    off = [v for v in (lo, opt, hi) if v % multiple]
    if off:
        raise ValueError(
            f"shapes[{name!r}] = {tuple(value)!r}: {off[0]} is not a multiple of {multiple}; the model "
            f"downsamples by {multiple} (a U-Net's down blocks, a transformer's patches), so latent "
            f"{'frame counts' if name == FRAMES else 'heights and widths'} must be multiples of it"
        )
    return DimRange(name, lo, opt, hi, multiple)


def evaluate(expr: DimExpr, values: Mapping[str, int]) -> int:
    """Returns the size that ``expr`` (an int or an expression over dim names) takes at ``values``.

    Raises:
        ValueError: for a malformed expression, an unknown name, or a size that is not a
            whole number.
    """
    if isinstance(expr, int):
        return expr
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"malformed shape expression {expr!r}") from e
    result = _eval(tree.body, values, expr)
    if result.denominator != 1:
        raise ValueError(f"shape expression {expr!r} is not a whole number at {dict(values)}")
    return int(result)


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if b else _zero(),
    ast.FloorDiv: lambda a, b: Fraction(a // b) if b else _zero(),
}


def _zero() -> Fraction:
    raise ValueError("shape expression divides by zero")


def _eval(node: ast.AST, values: Mapping[str, int], expr: str) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        if node.id not in values:
            raise ValueError(f"shape expression {expr!r} names unknown dimension {node.id!r}")
        return Fraction(values[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, values, expr), _eval(node.right, values, expr))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, values, expr)
    raise ValueError(f"shape expression {expr!r} may hold only ints, dimension names and + - * /")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: names, dtype and shape (ints and dimension expressions).

    ``name`` is the flat call name (``added_cond_kwargs.text_embeds``); ``graph_name`` is the
    name inside the exported graph (``added_cond_kwargs_text_embeds``).
    """

    name: str
    graph_name: str
    dtype: str
    shape: tuple[DimExpr, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return dtype_from_name(self.dtype)

    def size(self, values: Mapping[str, int]) -> tuple[int, ...]:
        """Returns the concrete shape at dimension ``values``."""
        return tuple(evaluate(d, values) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        """Returns the spec as JSON-able fields."""
        return {"name": self.name, "graph_name": self.graph_name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Returns the spec written by ``to_dict``."""
        return cls(data["name"], data["graph_name"], data["dtype"], tuple(data["shape"]))


def dtype_name(dtype: torch.dtype) -> str:
    """Returns ``torch.float16`` as ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Returns the ``torch.dtype`` named ``name`` (``"float16"``).

    Raises:
        ValueError: for a name that is not a torch dtype.
    """
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def bind_inputs(
    specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor], dims: Mapping[str, DimRange]
) -> dict[str, int]:
    """Checks ``tensors`` against the exported ``specs`` and ranges; returns the dim values.

    Raises:
        ValueError: naming the input and dimension that is off: a wrong rank, dtype or static
            size, a size outside the exported range, or sizes that disagree (a batch of 2 in
            the sample and 3 in the text embeddings).
    """
    if len(specs) != len(tensors):
        raise ValueError(
            f"the export takes inputs {[s.name for s in specs]}, got {len(tensors)} tensors; "
            f"call the U-Net with the arguments it was exported with"
        )
    values: dict[str, int] = {}
    # Plain names first (they define the values), then every expression is checked against them.
    for spec, tensor in zip(specs, tensors, strict=True):
        if tensor.dtype != spec.torch_dtype:
            raise ValueError(f"input {spec.name!r} has dtype {dtype_name(tensor.dtype)}; the export takes {spec.dtype}")
        if tensor.ndim != len(spec.shape):
            raise ValueError(
                f"input {spec.name!r} has shape {tuple(tensor.shape)}; the export takes rank {len(spec.shape)} "
                f"{_show(spec.shape)}"
            )
        for axis, (expr, size) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
            if isinstance(expr, str) and expr in dims and expr not in values:
                dim = dims[expr]
                if not dim.contains(size):
                    raise ValueError(
                        f"input {spec.name!r} dim {axis} ({expr}) is {size}, outside the exported range "
                        f"{dim.describe()}; export again with shapes={{{expr!r}: (min, max)}} covering it"
                    )
                values[expr] = size
    for spec, tensor in zip(specs, tensors, strict=True):
        expected = spec.size(values)
        if tuple(tensor.shape) != expected:
            axis = next(i for i, (a, b) in enumerate(zip(tensor.shape, expected, strict=True)) if a != b)
            expr = spec.shape[axis]
            how = "exactly" if isinstance(expr, int) else f"{expr} ="
            raise ValueError(
                f"input {spec.name!r} dim {axis} is {tensor.shape[axis]}; the export takes {how} {expected[axis]} "
                f"there (with {values or 'static shapes'}): shape {tuple(tensor.shape)} vs export {_show(spec.shape)}"
            )
    return values


def _show(shape: Sequence[DimExpr]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
