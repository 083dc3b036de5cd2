"""Diffusion transformers (SD3, Flux, PixArt, DiT, Sana, Wan): a list, or lists, of blocks.

A diffusion transformer embeds the sample into tokens, runs them through one list of blocks
(SD3, PixArt, DiT, Sana, Wan) or two chained lists (Flux: double-stream, then single-stream
blocks), and maps the tokens back through an output head. The same idea as DeepCache applies
(cache-dit's DBCache): run the first F and the last B blocks every step; on cached steps
replace the blocks in between by the residual they added at the last full step. A place to
cut is a ``BlockRange``.

Blocks pass one stream (the image tokens) or two (joint blocks: image and text tokens). The
streams a block takes are read from its call by name (``hidden_states`` and, where the block
returns it, ``encoder_hidden_states``); what it returns is a tensor or a pair, which diffusers
returns as ``(encoder_hidden_states, hidden_states)``.

Models are recognised by structure (module lists of blocks named ``*blocks``, a forward that
takes ``hidden_states``), so subclasses and copies of the diffusers classes work. Nothing here
knows FX.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcfx.models.spec import ModelSpec, _signature

TRANSFORMER_LAYOUT = "diffusion transformer (blocks between an embedding and a head)"
PACKED_LAYOUT = "diffusion transformer on packed tokens (Flux)"
VIDEO_LAYOUT = "video diffusion transformer (Wan)"
# Module-list attributes that hold a transformer's blocks, in the order the forward runs them.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
# Inputs without a batch dimension: Flux's positions of the image and text tokens.
UNBATCHED = ("img_ids", "txt_ids")


def block_lists(model: nn.Module) -> list[tuple[str, int]]:
    """Returns ``[(attribute, length)]`` of the model's non-empty block lists, in running order."""
    found = []
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            found.append((name, len(blocks)))
    return found


def is_transformer(model: nn.Module) -> bool:
    """Returns whether ``model`` has a diffusion transformer's layout (see the module docstring).

    One or two block lists, a forward whose first parameter is ``hidden_states`` and a
    diffusers-style config with ``in_channels`` and ``patch_size``; no U-Net parts.
    """
    if hasattr(model, "up_blocks") or hasattr(model, "output_blocks") or not block_lists(model):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "in_channels", None) is None or getattr(config, "patch_size", None) is None:
        return False
    params = list(_signature(type(model)).parameters)
    return bool(params) and params[0] == "hidden_states"


def takes_packed_tokens(model: nn.Module) -> bool:
    """Returns whether the transformer takes its sample as packed tokens (Flux: batch, tokens, channels)."""
    return is_transformer(model) and isinstance(getattr(model, "x_embedder", None), nn.Linear)


def takes_video(model: nn.Module) -> bool:
    """Returns whether the transformer takes video (Wan: a 3-D patch, batch, channels, frames, height, width)."""
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    return is_transformer(model) and isinstance(patch, (tuple, list)) and len(patch) == 3


@dataclass(frozen=True)
class BlockRange:
    """The cut of a transformer: the first ``first`` and last ``last`` blocks run every step.

    ``blocks`` are the module paths of every block in running order (``transformer_blocks.0``
    ... and, for Flux, ``single_transformer_blocks.0`` ...); the blocks between the first
    ``first`` and the last ``last`` are the cached middle.
    """

    first: int
    last: int
    blocks: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.blocks)
        if self.first < 0 or self.last < 0 or self.first + self.last >= n:
            raise ValueError(
                f"first={self.first}, last={self.last} leave no block to cache: this model has {n} blocks, so "
                f"first + last must be at most {n - 1} (first, last >= 0)"
            )

    @property
    def name(self) -> str:
        """How messages name the cut: ``F1B1`` (cache-dit's notation)."""
        return f"F{self.first}B{self.last}"

    @property
    def entry(self) -> str:
        """The path of the first cached block (its input streams are the residuals' base)."""
        return self.blocks[self.first]

    @property
    def exit(self) -> str:
        """The path of the last cached block (its output streams minus the base are the residuals)."""
        return self.blocks[len(self.blocks) - 1 - self.last]

    def deep_paths(self) -> list[str]:
        """Returns the module paths a cached step must not run: the middle blocks."""
        return list(self.blocks[self.first : len(self.blocks) - self.last])


@dataclass(frozen=True)
class TransformerSpec(ModelSpec):
    """How dcfx calls and cuts a diffusion transformer (see the module docstring)."""

    output_field: str = "sample"
    sample_input: str = "hidden_states"
    layer_depth: int = 2

    def default_size(self, model: nn.Module) -> int:  # noqa: D102
        size = getattr(model.config, "sample_size", None) or 64
        return int(size if isinstance(size, int) else size[0])

    def downsampling_factor(self, model: nn.Module) -> int:
        """Returns the patch size: heights and widths must be multiples of it."""
        patch = model.config.patch_size
        return int(patch[-1] if isinstance(patch, (tuple, list)) else patch)

    def context_width(self, model: nn.Module) -> int | None:
        """Returns the width of the text states the model takes (None: not checked)."""
        cfg = model.config
        for key in ("joint_attention_dim", "caption_channels", "text_dim"):
            width = getattr(cfg, key, None)
            if isinstance(width, int):
                return width
        return None

    def check_inputs(self, model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """As ``ModelSpec.check_inputs``; token positions (Flux's ``img_ids``, ``txt_ids``) have no batch."""
        kept = [(n, t) for n, t in zip(names, tensors, strict=True) if n not in UNBATCHED]
        super().check_inputs(model, tuple(n for n, _ in kept), tuple(t for _, t in kept))

    def cast(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:  # noqa: D102
        return copy.deepcopy(model).to(dtype)

    def unbatched_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """Returns the forward parameters without a batch dimension (Flux's token positions), for stored specs."""
        params = _signature(type(model)).parameters
        return tuple(name for name in UNBATCHED if name in params)

    def check_sample_shape(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        """Raises ValueError unless ``shape`` has this layout's rank, channels and patch multiples."""
        super().check_sample_shape(model, shape)
        patch = self.downsampling_factor(model)
        if "height" in self.sample_dims and (shape[-1] % patch or shape[-2] % patch):
            raise ValueError(
                f"the sample's height and width must be multiples of the patch size {patch} for "
                f"{type(model).__name__}, got {tuple(shape)}"
            )

    def sample_shape(self, model: nn.Module, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Returns the sample shape at ``batch``, ``height``, ``width`` (latent sizes).

        Packed tokens (Flux) are 2x2 latent patches: ``height * width / 4`` of them.
        """
        if "tokens" in self.sample_dims:
            return (batch, (height // 2) * (width // 2), self.in_channels(model))
        if "frames" in self.sample_dims:
            return (batch, self.in_channels(model), 1, height, width)
        return super().sample_shape(model, batch, height, width)

    def up_layers(self, model: nn.Module) -> list[Any]:
        """A transformer has no up layers: its cut is a ``BlockRange`` (``first=``/``last=``)."""
        raise TypeError(
            f"{type(model).__name__} is a diffusion transformer: it is cut by first= and last= (the blocks that run "
            f"every step), not by a U-Net branch="
        )

    def blocks(self, model: nn.Module) -> tuple[str, ...]:
        """Returns the module paths of every block, in running order."""
        return tuple(f"{name}.{i}" for name, n in block_lists(model) for i in range(n))

    def block_range(self, model: nn.Module, first: int, last: int) -> BlockRange:
        """Returns the cut that runs the first ``first`` and the last ``last`` blocks every step."""
        return BlockRange(first, last, self.blocks(model))

    def output_class(self) -> Any:  # noqa: D102
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput

    def example_call(
        self, model: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        """Returns keyword arguments of a typical call with a sample of ``sample_shape``.

        The inputs are those the model's pipeline passes: 8 prompt tokens (with their mask, all
        ones, where the model takes one: PixArt, Sana, as their tokenizers give it), and for a
        model with embedded guidance (Flux-dev) the guidance scale per row in float32, as
        ``FluxPipeline`` passes it.
        """
        cfg = model.config
        batch = sample_shape[0]
        params = _signature(type(model)).parameters
        call: dict[str, Any] = {
            "hidden_states": torch.randn(sample_shape, dtype=dtype, device=device),
            "timestep": torch.full((batch,), 500.0, device=device),
        }
        width = self.context_width(model)
        if "encoder_hidden_states" in params and width is not None:
            call["encoder_hidden_states"] = torch.randn(batch, 8, width, dtype=dtype, device=device)
        if "pooled_projections" in params:
            call["pooled_projections"] = torch.randn(batch, cfg.pooled_projection_dim, dtype=dtype, device=device)
        if "class_labels" in params and getattr(cfg, "num_embeds_ada_norm", None):
            call["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
        if "img_ids" in params:  # Flux: positions of the image and text tokens
            call["img_ids"] = torch.zeros(sample_shape[1], 3, dtype=dtype, device=device)
            call["txt_ids"] = torch.zeros(8, 3, dtype=dtype, device=device)
        if "encoder_attention_mask" in params and "encoder_hidden_states" in call:  # PixArt, Sana: the prompt's mask
            call["encoder_attention_mask"] = torch.ones(batch, 8, dtype=torch.long, device=device)
        if "guidance" in params and getattr(cfg, "guidance_embeds", False):  # Flux-dev, Sana-Sprint: embedded guidance
            call["guidance"] = torch.full((batch,), 3.5, device=device)
        if "added_cond_kwargs" in params:
            call["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return call


def transformer_spec(model_class: type[nn.Module]) -> TransformerSpec:
    """Returns the spec of a transformer class that takes (batch, channels, height, width)."""
    return TransformerSpec(model_class)


def packed_transformer_spec(model_class: type[nn.Module]) -> TransformerSpec:
    """Returns the spec of a transformer class that takes packed tokens (batch, tokens, channels)."""
    return TransformerSpec(model_class, sample_dims=("batch", "tokens", "channels"), timestep_divisor=1000.0)


def video_transformer_spec(model_class: type[nn.Module]) -> TransformerSpec:
    """Returns the spec of a video transformer class (batch, channels, frames, height, width)."""
    return TransformerSpec(model_class, sample_dims=("batch", "channels", "frames", "height", "width"))


# The layouts, most specific first: (name, matches(model), spec for a class).
LAYOUTS = (
    (PACKED_LAYOUT, takes_packed_tokens, packed_transformer_spec),
    (VIDEO_LAYOUT, takes_video, video_transformer_spec),
    (TRANSFORMER_LAYOUT, is_transformer, transformer_spec),
)
