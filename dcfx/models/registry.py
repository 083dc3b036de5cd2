"""Which ``ModelSpec`` a model gets: by its class, or by its structure (a registered layout).

The diffusers U-Nets and the latent-diffusion ``UNetModel`` layout are registered on the first
lookup; ``register_model`` and ``register_layout`` add others.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dcfx.models.ldm import LDM_LAYOUT, is_ldm_unet, ldm_spec
from dcfx.models.spec import ModelSpec
from dcfx.models.transformer import BLOCK_LISTS
from dcfx.models.transformer import LAYOUTS as TRANSFORMER_LAYOUTS

_SPECS: dict[type, ModelSpec] = {}
# Layouts recognised by structure rather than by class: (name, matches(model), spec for a class).
_LAYOUTS: list[tuple[str, Callable[[nn.Module], bool], Callable[[type[nn.Module]], ModelSpec]]] = []


def register_model(spec: ModelSpec) -> ModelSpec:
    """Registers ``spec`` for its model class (and subclasses); returns it."""
    _SPECS[spec.model_class] = spec
    return spec


def register_layout(
    name: str, matches: Callable[[nn.Module], bool], make_spec: Callable[[type[nn.Module]], ModelSpec]
) -> None:
    """Registers a layout chosen by structure: any model ``matches`` accepts gets ``make_spec(its class)``.

    For model classes that many codebases copy and derive from (the latent-diffusion
    ``UNetModel``), where no single class can be imported and registered. Classes registered
    with ``register_model`` take precedence.
    """
    _LAYOUTS.append((name, matches, make_spec))


_BUILTINS_REGISTERED = False


def _register_diffusers() -> None:
    global _BUILTINS_REGISTERED
    _BUILTINS_REGISTERED = True
    from diffusers import UNet2DConditionModel, UNet2DModel, UNetSpatioTemporalConditionModel

    register_model(ModelSpec(UNet2DConditionModel))
    register_model(ModelSpec(UNet2DModel))
    video = ("batch", "frames", "channels", "height", "width")
    register_model(ModelSpec(UNetSpatioTemporalConditionModel, sample_dims=video))
    if not any(name == LDM_LAYOUT for name, _, _ in _LAYOUTS):
        register_layout(LDM_LAYOUT, is_ldm_unet, ldm_spec)
    for name, matches, make_spec in TRANSFORMER_LAYOUTS:
        if not any(known == name for known, _, _ in _LAYOUTS):
            register_layout(name, matches, make_spec)


def spec_for(model: nn.Module) -> ModelSpec:
    """Returns the ``ModelSpec`` of ``model``.

    Raises:
        TypeError: for a model dcfx does not support, naming the supported classes.
    """
    if not _BUILTINS_REGISTERED:
        _register_diffusers()
    for cls in type(model).__mro__:
        if cls in _SPECS:
            return _SPECS[cls]
    for _, matches, make_spec in _LAYOUTS:
        if matches(model):
            return make_spec(type(model))
    supported = ", ".join([*sorted(c.__name__ for c in _SPECS), *(name for name, _, _ in _LAYOUTS)])
    name = type(model).__name__
    if _is_transformer_denoiser(model):
        raise TypeError(
            f"dcfx does not support {name}: it looks like a transformer denoiser, but dcfx cuts transformers by "
            f"their blocks: module lists named {', '.join(BLOCK_LISTS)}, run by a forward(hidden_states, ...) of a "
            f"model with a diffusers config (in_channels, patch_size). Supported: {supported}."
        )
    raise TypeError(
        f"dcfx does not support {name}: DeepCache needs a diffusers U-Net whose up blocks take the "
        f"skip connections in the diffusers layout (up_blocks[i].resnets[j], one skip each), or a "
        f"latent-diffusion UNetModel (input_blocks, middle_block, output_blocks; forward(x, timesteps, "
        f"context, y)). "
        f"Supported: {supported}. A custom U-Net with that layout and a diffusers-style forward can be "
        f"registered with dcfx.models.register_model(dcfx.models.ModelSpec({name}))."
    )


def _is_transformer_denoiser(model: nn.Module) -> bool:
    # diffusers' DiT-family models (DiT, PixArt, SD3, Flux, ...) live in models/transformers and
    # are named *Transformer*Model; a transformer without up_blocks cannot be a U-Net.
    module = type(model).__module__
    return "Transformer" in type(model).__name__ and (".transformers." in module or not hasattr(model, "up_blocks"))
