"""Where an export's named dimensions lie in a call's inputs, and calls resized along them.

The dimensions are ``batch``, ``height`` and ``width`` (latent pixels), ``tokens`` (the
prompt: the length of the text states) and, for a transformer on packed tokens (Flux),
``image_tokens`` (its sample is ``(batch, image_tokens, channels)``, 2x2 latent patches),
and for a video transformer (Wan) ``frames`` (latent frames).
``named_axes`` says, for each flat input of a call, which axis carries which dimension and
at what divisor (a ControlNet residual at half the sample's resolution carries ``height/2``);
everything that sizes, resizes or marks a call dynamic reads it, so no rule below knows a
model class. The inputs beyond the sample and the text states that carry the tokens are
named by the diffusers forward parameter (``TEXT_TOKEN_AXES``, ``IMAGE_TOKEN_AXES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from dcfx.export.shapes import FRAMES, IMAGE_TOKENS, DimRange
from dcfx.models import spec_for
from dcfx.models.transformer import UNBATCHED

# Inputs that carry the prompt's tokens besides the text states: forward parameter -> axis
# (PixArt's and Sana's mask of the text states; Flux's text token positions, unbatched).
TEXT_TOKEN_AXES = {"encoder_attention_mask": 1, "txt_ids": 0}
# Inputs that carry a packed sample's image tokens besides the sample (Flux's positions).
IMAGE_TOKEN_AXES = {"img_ids": 0}
# The latent pixels of one packed token per side (Flux packs 2x2 latent patches).
PACKING = 2
# Dimensions that move in steps of a multiple (traced in units of it).
UNIT_DIMS = ("height", "width", FRAMES)

Axes = dict[str, dict[int, tuple[str, int]]]  # input name -> axis -> (dimension, divisor)


def packed(spec: Any) -> bool:
    """Returns whether the model takes its sample as packed tokens ``(batch, tokens, channels)``."""
    return tuple(spec.sample_dims) == ("batch", "tokens", "channels")


def frame_multiple(model: nn.Module) -> int:
    """Returns what a video model's latent frame counts must be multiples of (its temporal patch; 1 for images)."""
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    return int(patch[0]) if isinstance(patch, (tuple, list)) and len(patch) == 3 else 1


def sample_frames(model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> int | None:
    """Returns the latent frames of a video model's call (None for an image model)."""
    spec = spec_for(model)
    if FRAMES not in spec.sample_dims:
        return None
    return int(tensors[names.index(spec.sample_input)].shape[spec.sample_dims.index(FRAMES)])


def spatial_multiple(model: nn.Module) -> int:
    """Returns what latent heights and widths must be multiples of (the downsampling factor, or the packing)."""
    spec = spec_for(model)
    return PACKING if packed(spec) else spec.downsampling_factor(model)


def named_axes(model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Axes:
    """Returns which axis of each flat input carries which named dimension, and at what divisor.

    Every input whose first axis is the sample's batch carries the batch (not token positions,
    which have none); inputs of the sample's rank (the sample, ControlNet residuals) carry its
    height and width (and a video's frames) on the sample's axes, divided by their ratio to
    the sample's; the text states carry the tokens
    on their second axis, as do the inputs of ``TEXT_TOKEN_AXES`` whose axis has their length.
    A packed sample carries the image tokens on its second axis.

    Raises:
        ValueError: an input of the sample's rank whose size is not the sample's divided by a
            whole number.
    """
    spec = spec_for(model)
    sample = tensors[names.index(spec.sample_input)]
    is_packed = packed(spec)
    spatial = [(spec.sample_dims.index(d), d) for d in (FRAMES, "height", "width") if d in spec.sample_dims]
    context = tensors[names.index(spec.context_input)] if spec.context_input in names else None
    tokens = int(context.shape[1]) if context is not None and context.ndim == 3 else None
    out: Axes = {}
    for name, tensor in zip(names, tensors, strict=True):
        axes: dict[int, tuple[str, int]] = {}
        if tensor.ndim and name not in UNBATCHED and tensor.shape[0] == sample.shape[0]:
            axes[0] = ("batch", 1)
        if is_packed and name == spec.sample_input:
            axes[1] = (IMAGE_TOKENS, 1)
        elif is_packed and name in IMAGE_TOKEN_AXES and _has(tensor, IMAGE_TOKEN_AXES[name], sample.shape[1]):
            axes[IMAGE_TOKEN_AXES[name]] = (IMAGE_TOKENS, 1)
        elif not is_packed and tensor.ndim == sample.ndim >= 4:
            for axis, dim in spatial:
                ratio, rest = divmod(sample.shape[axis], tensor.shape[axis])
                if rest or ratio < 1:
                    raise ValueError(
                        f"a {tensor.ndim}-d input ({name}) of size {tuple(tensor.shape)} does not scale with the "
                        f"sample {tuple(sample.shape)} by a whole number; export it with a static {dim}"
                    )
                axes[axis] = (dim, ratio)
        if name == spec.context_input and tokens is not None:
            axes[1] = ("tokens", 1)
        elif name in TEXT_TOKEN_AXES and tokens is not None and _has(tensor, TEXT_TOKEN_AXES[name], tokens):
            axes[TEXT_TOKEN_AXES[name]] = ("tokens", 1)
        out[name] = axes
    return out


def _has(tensor: torch.Tensor, axis: int, size: int) -> bool:
    return tensor.ndim > axis and int(tensor.shape[axis]) == size and not (axis == 0 and tensor.ndim == 0)


def locate(axes: Axes, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Returns, per named dimension, the first (input index, axis) that carries it whole (divisor 1)."""
    found: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(names):
        for axis, (dim, divisor) in axes[name].items():
            if divisor == 1:
                found.setdefault(dim, (i, axis))
    return found


def call_sizes(model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Returns the named sizes of a call: batch, height and width (or image tokens) of the sample, tokens."""
    axes = named_axes(model, names, tensors)
    return {dim: int(tensors[i].shape[axis]) for dim, (i, axis) in locate(axes, names).items()}


def resize_call(
    model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], sizes: Mapping[str, int]
) -> tuple[torch.Tensor, ...]:
    """Returns the call's inputs at the named ``sizes`` (new random values where a size changes).

    What a capture over dynamic dims is traced with: ``torch.export`` specialises sizes 0
    and 1, so a call of batch 1 cannot be traced for a range that starts at 1 (``trace_sizes``
    picks sizes that can).
    """
    axes = named_axes(model, names, tensors)
    resized = []
    for name, tensor in zip(names, tensors, strict=True):
        shape = list(tensor.shape)
        for axis, (dim, divisor) in axes[name].items():
            if dim in sizes:
                shape[axis] = sizes[dim] // divisor
        if list(tensor.shape) == shape:
            resized.append(tensor)
        elif tensor.dtype.is_floating_point:
            resized.append(torch.randn(shape, dtype=tensor.dtype, device=tensor.device))
        elif name in TEXT_TOKEN_AXES:  # a mask: every token attended
            resized.append(torch.ones(shape, dtype=tensor.dtype, device=tensor.device))
        else:
            resized.append(torch.zeros(shape, dtype=tensor.dtype, device=tensor.device))
    return tuple(resized)


def export_dims(dims: Mapping[str, DimRange]) -> dict[str, Any]:
    """Returns ``torch.export`` dims for the named ranges (None for a static one).

    Heights and widths (and frames) count in units of their multiple (the downsampling factor,
    the temporal patch), so that every traced size stays a multiple of it.
    """
    return {
        name: None
        if dim.static
        else Dim(f"{name}_units" if name in UNIT_DIMS else name, min=_units(dim, 0), max=_units(dim, 1))
        for name, dim in dims.items()
    }


def _units(dim: DimRange, upper: int) -> int:
    return (dim.max if upper else dim.min) // dim.multiple


def dynamic_axes(
    model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dims: Mapping[str, DimRange]
) -> dict[str, dict[int, Any] | None]:
    """Returns the ``torch.export`` dynamic axes of each flat input of a call over ``dims`` (``named_axes``).

    Raises:
        ValueError: an input at a fraction of a dynamic dimension that its multiple does not
            divide (its size could not follow every size of the range).
    """
    torch_dims = export_dims(dims)
    out: dict[str, dict[int, Any] | None] = {}
    for name, axes in named_axes(model, names, tensors).items():
        marked: dict[int, Any] = {}
        for axis, (dim, divisor) in axes.items():
            if torch_dims.get(dim) is None:
                continue
            multiple = dims[dim].multiple if dim in UNIT_DIMS else 1
            if multiple % divisor:
                raise ValueError(
                    f"input {name!r} is at 1/{divisor} of the {dim}, which moves in steps of {multiple}: its size "
                    f"would not be whole over the range; export it with a static {dim}"
                )
            scale = multiple // divisor
            marked[axis] = scale * torch_dims[dim] if scale > 1 else torch_dims[dim]
        out[name] = marked or None
    return out


def trace_size(dim: DimRange) -> int:
    """Returns the size to trace ``dim`` at: ``opt``, moved off 1 unit (export specialises 0/1)."""
    unit = dim.multiple
    if dim.static or dim.opt // unit >= 2:
        return dim.opt
    return min(2 * unit, dim.max) if dim.max // unit >= 2 else dim.opt


def trace_sizes(
    dims: Mapping[str, DimRange], start: Mapping[str, int] | None = None, avoid: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Returns the sizes to trace ``dims`` at: ``start`` (default ``trace_size``), dynamic ones kept apart.

    torch.export specialises what a trace ties to a constant, and says nothing when the
    dimension is a multiple of a unit (heights and widths). Two dynamic dimensions traced at one
    size may be tied together (torch's reshapes guard on the sizes they meet: PixArt traced on
    square latents came out square-only), and a model may special-case its configured size
    (diffusers' PatchEmbed reuses its stored position embedding there: PixArt traced at its
    sample size came out with that height fixed). So each dynamic dimension is moved by its
    multiple, within its range and off 1 unit (which torch.export specialises), until its size
    and unit count differ from those of the dimensions before it and from ``avoid[name]``,
    where the range allows.
    """
    sizes: dict[str, int] = {}
    taken: set[int] = set()
    for name, dim in dims.items():
        size = (start or {}).get(name, 0)
        size = size if dim.contains(size) else trace_size(dim)
        if not dim.static:
            unit = dim.multiple
            banned = taken | {(avoid or {}).get(name, 0)}
            steps = [size + k * unit for k in range(8)] + [size - k * unit for k in range(1, 8)]
            usable = [c for c in steps if dim.contains(c) and c // unit >= 2]
            free = [c for c in usable if c not in banned and c // unit not in taken]
            size = (free or usable or [size])[0]
            taken |= {size, size // unit}
        sizes[name] = size
    return sizes


def trace_call(
    model: nn.Module,
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    dims: Mapping[str, DimRange],
    start: Mapping[str, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Returns the call resized to the sizes a capture over ``dims`` is traced at (``trace_sizes``).

    Sizes of the call outside ``dims`` stay; ``start`` are preferred sizes (an export's
    example's); the model's configured height and width are avoided.
    """
    sizes = call_sizes(model, names, tensors)
    configured = spec_for(model).default_size(model)
    want = trace_sizes(dims, start, {"height": configured, "width": configured})
    return resize_call(model, names, tensors, {**sizes, **want})


def model_dims(model: nn.Module, dims: Mapping[str, DimRange]) -> dict[str, DimRange]:
    """Returns the ranges as the model's inputs carry them: a packed sample's height and width become image tokens.

    A packed token is a 2x2 patch of latent pixels, so heights h and widths w give
    ``(h / 2) * (w / 2)`` image tokens; the range covers every count between the smallest
    and the largest image (the graphs take any count).
    """
    if not packed(spec_for(model)) or "height" not in dims:
        return dict(dims)
    out = {name: dim for name, dim in dims.items() if name not in ("height", "width")}
    h, w = dims["height"], dims["width"]
    lo, opt, hi = ((getattr(h, k) // PACKING) * (getattr(w, k) // PACKING) for k in ("min", "opt", "max"))
    return {"batch": out.pop("batch"), IMAGE_TOKENS: DimRange(IMAGE_TOKENS, lo, opt, hi), **out}
