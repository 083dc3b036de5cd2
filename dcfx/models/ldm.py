"""The original latent-diffusion U-Net layout: ``UNetModel`` of CompVis' ``openaimodel.py``.

The paper's LDM-4-G, the Stability reference repositories (SD 1.x/2.x, ``sgm``) and the models
ComfyUI, A1111 and Forge run derive from one class: ``input_blocks``, ``middle_block`` and
``output_blocks`` (``nn.ModuleList`` of ``TimestepEmbedSequential``), each output block running on
``cat([h, hs.pop()])``, and ``forward(x, timesteps=None, context=None, y=None, ...)`` returning the
output tensor. Many codebases copy that class, so the layout is recognised by this structure, not
by an import path, and nothing here imports their code.

Branch b caches the input of ``output_blocks[len - 1 - b]``: the output blocks are the up
layers, numbered from the output end as in diffusers U-Nets.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcfx.models.spec import ModelSpec, UpLayer

LDM_LAYOUT = "latent-diffusion UNetModel"
FORWARD = ("x", "timesteps", "context", "y")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_ldm_unet(model: nn.Module) -> bool:
    """Returns whether ``model`` has the latent-diffusion ``UNetModel`` layout.

    That is: ``input_blocks`` and ``output_blocks`` as module lists of the same length (each
    output block takes one input block's skip), a ``middle_block``, and a forward whose first
    parameters are ``x, timesteps, context, y``.
    """
    inputs, outputs = getattr(model, "input_blocks", None), getattr(model, "output_blocks", None)
    if not (isinstance(inputs, nn.ModuleList) and isinstance(outputs, nn.ModuleList)):
        return False
    if not isinstance(getattr(model, "middle_block", None), nn.Module) or len(inputs) != len(outputs):
        return False
    names = [p.name for p in _forward_parameters(type(model))]
    return tuple(names[: len(FORWARD)]) == FORWARD


@dataclass(frozen=True)
class OutputBlock(UpLayer):
    """One output block of a latent-diffusion ``UNetModel``: the up layer of one skip branch.

    ``index`` indexes ``model.output_blocks``; ``block`` is its resolution level counted from
    the deepest (as diffusers' ``up_blocks``) and ``layer`` its place within that level.
    """

    index: int

    @property
    def path(self) -> str:
        """The module path of the output block, e.g. ``output_blocks.11``."""
        return f"output_blocks.{self.index}"

    def deep_paths(self) -> list[str]:
        """Returns the middle block and the output blocks before this one."""
        return ["middle_block"] + [f"output_blocks.{i}" for i in range(self.index)]


@dataclass(frozen=True)
class LdmSpec(ModelSpec):
    """How dcfx calls and cuts a latent-diffusion ``UNetModel`` (or a class with its layout).

    Calls flatten as ``x``, ``timesteps``, ``context`` and ``y`` (class labels or ADM vectors);
    the forward returns the output tensor, and so does the runtime.
    """

    output_field: str = "x"
    sample_input: str = "x"
    timestep_input: str = "timesteps"
    context_input: str = "context"
    layer_depth: int = 2  # output_blocks.11
    returns_tensor: bool = True

    def signature(self, model: nn.Module) -> inspect.Signature:
        """Returns the forward's named parameters; ``timesteps`` is required (the model needs it)."""
        return _ldm_signature(type(model))

    def up_layers(self, model: nn.Module) -> list[UpLayer]:
        """Returns every output block as an up layer, ordered by branch id (output end first)."""
        levels: list[list[int]] = [[]]
        for index, block in enumerate(model.output_blocks):
            levels[-1].append(index)
            if index < len(model.output_blocks) - 1 and _has(block, "Upsample"):
                levels.append([])
        layers: list[UpLayer] = []
        for level in reversed(range(len(levels))):
            for layer in reversed(range(len(levels[level]))):
                layers.append(OutputBlock(len(layers), level, layer, levels[level][layer]))
        return layers

    def in_channels(self, model: nn.Module) -> int:
        """Returns the input channels of the first convolution (``input_blocks[0]``)."""
        conv = next((m for m in model.input_blocks[0].modules() if isinstance(m, _CONVS)), None)
        if conv is None:
            raise TypeError(f"{type(model).__name__}.input_blocks[0] holds no convolution: not a UNetModel layout")
        return int(conv.in_channels)

    def default_size(self, model: nn.Module) -> int:
        """Returns ``model.image_size``: the latent size the model was configured with.

        Raises:
            ValueError: when the model keeps no integer ``image_size``.
        """
        size = getattr(model, "image_size", None)
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(
                f"{type(model).__name__} has no integer image_size (got {size!r}): give the sample shape or "
                f"sizes explicitly (dcfx.branches(unet, sample_shape=...), dcfx.export(..., shapes=...))"
            )
        return size

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """Returns the model's plain settings (what its constructor kept as attributes).

        ``UNetModel`` has no config object; its public attributes that are numbers, strings,
        dtypes or lists of them stand in, with the class name and the cross-attention width.
        """
        config: dict[str, Any] = {"_class_name": type(model).__name__}
        for name, value in sorted(vars(model).items()):
            if name.startswith("_") or name == "training":
                continue
            plain = _plain(value)
            if plain is not _NOT_PLAIN:
                config[name] = plain
        config["context_dim"] = self.context_width(model)
        return config

    def placement(self, model: nn.Module) -> tuple[torch.dtype, torch.device]:
        """Returns the dtype and device of the output head's weights (``model.out``).

        The forward runs its blocks in its own ``dtype`` (fp16 torso with ``use_fp16``) but
        casts back to ``x``'s dtype before the head, so ``x`` must have the head's dtype.
        """
        head = getattr(model, "out", None)
        param = next(head.parameters() if isinstance(head, nn.Module) else model.parameters())
        return param.dtype, param.device

    def context_width(self, model: nn.Module) -> int | None:
        """Returns the width cross-attention takes ``context`` in (None: no cross-attention).

        Read from the transformer blocks' cross-attention (``attn2.to_k``), not from a config.
        """
        widths = {
            int(m.attn2.to_k.in_features)
            for m in model.modules()
            if isinstance(getattr(getattr(m, "attn2", None), "to_k", None), nn.Linear)
        }
        return widths.pop() if len(widths) == 1 else None

    def downsampling_factor(self, model: nn.Module) -> int:
        """Returns 2 ** (number of input blocks that downsample)."""
        return 2 ** sum(1 for block in model.input_blocks if _has(block, "Downsample"))

    def call(self, model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        """Returns ``model(**kwargs)``: the forward returns the output tensor."""
        return model(**kwargs)

    def cast(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """Returns a copy of ``model`` in ``dtype``, its ``dtype`` attribute included.

        ``UNetModel`` casts ``x`` to its plain ``dtype`` attribute (set from ``use_fp16``),
        which ``.to(dtype)`` leaves as it was.
        """
        copied = copy.deepcopy(model).to(dtype)
        if isinstance(vars(copied).get("dtype"), torch.dtype):
            copied.dtype = dtype
        return copied

    def check_inputs(self, model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """Raises for a call ``model`` cannot take (see ``ModelSpec.check_inputs``).

        Also checks what ``UNetModel`` asserts or fails on later: ``y`` given exactly when the
        model is class-conditional (``label_emb``), and ``context`` given to a model with
        cross-attention.

        Raises:
            TypeError: an ``x`` that is not floating point, or not in the output head's dtype.
            ValueError: a wrong shape, batch or device, or a missing or unexpected input.
        """
        super().check_inputs(model, names, tensors)
        if hasattr(model, "label_emb") != ("y" in names):
            if "y" in names:
                raise ValueError(f"y was given, but {type(model).__name__} is not class-conditional (no label_emb)")
            raise ValueError(f"{type(model).__name__} is class-conditional (label_emb): pass y, the class labels")
        width = self.context_width(model)
        if width is not None and "context" not in names:
            raise ValueError(
                f"{type(model).__name__} has cross-attention: pass context of shape (batch, tokens, {width})"
            )

    def example_call(
        self, model: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        """Returns keyword arguments of a typical call: ``x``, ``timesteps``, and ``context``, ``y`` as needed.

        ``context`` has 77 tokens (a CLIP prompt); ``y`` is a class label for an embedding
        table, or a zero vector for a linear label embedding (SDXL's ADM vector in ``sgm``).
        """
        batch = sample_shape[0]
        call: dict[str, Any] = {
            "x": torch.randn(sample_shape, dtype=dtype, device=device),
            "timesteps": torch.full((batch,), 500.0, device=device),
        }
        width = self.context_width(model)
        if width is not None:
            call["context"] = torch.randn(batch, 77, width, dtype=dtype, device=device)
        label = getattr(model, "label_emb", None)
        if isinstance(label, nn.Embedding):
            call["y"] = torch.zeros(batch, dtype=torch.long, device=device)
        elif isinstance(label, nn.Module):
            linear = next((m for m in label.modules() if isinstance(m, nn.Linear)), None)
            if linear is None:
                raise NotImplementedError(f"example inputs for a label_emb of type {type(label).__name__}")
            call["y"] = torch.zeros(batch, linear.in_features, dtype=dtype, device=device)
        return call


def ldm_spec(model_class: type[nn.Module]) -> LdmSpec:
    """Returns the spec of a class with the latent-diffusion ``UNetModel`` layout."""
    return _ldm_spec(model_class)


@functools.cache
def _ldm_spec(model_class: type[nn.Module]) -> LdmSpec:
    return LdmSpec(model_class)


def _has(block: nn.Module, class_name: str) -> bool:
    # Every copy of the layout (ldm, sgm, ComfyUI) names its resampling modules so; a ResBlock
    # that resamples holds one too.
    return any(type(m).__name__ == class_name for m in block.modules())


def _forward_parameters(model_class: type) -> list[inspect.Parameter]:
    params = list(inspect.signature(model_class.forward).parameters.values())
    return [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@functools.cache
def _ldm_signature(model_class: type) -> inspect.Signature:
    # **kwargs is dropped: dcfx refuses keywords the graph would not see, naming the valid ones.
    params = [
        p.replace(default=inspect.Parameter.empty) if p.name == "timesteps" else p
        for p in _forward_parameters(model_class)
    ]
    return inspect.Signature(params)


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        items = {str(k): _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, (str, bytes)):
        items = [_plain(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN
