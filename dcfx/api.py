"""The public verbs: compile, enable, disable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from dcfx import schedule
from dcfx.backends import check_options, get_backend
from dcfx.builds import BuildRequest, cache_dir_from, make_build
from dcfx.config import DeepCacheConfig
from dcfx.export.axes import frame_multiple, model_dims, spatial_multiple
from dcfx.export.shapes import FRAMES, TRANSFORMER_TOKENS, DimRange, default_side_range, parse_dims
from dcfx.hooks import check_capturable
from dcfx.models import ModelSpec, TransformerSpec
from dcfx.resolve import check_branch, model_spec, split_config_fields
from dcfx.runtime import DeepCacheUNet
from dcfx.steps import PipelineScheduler

# dynamic=True: the ranges a server meets (heights and widths: half to twice the model's size).
DYNAMIC_DEFAULTS: dict[str, Any] = {"batch": (1, 2, 16), "tokens": (2, 77, 308)}


def compile(  # noqa: A001  (the public verb shadows the builtin inside this module only)
    unet: nn.Module,
    config: DeepCacheConfig | str | os.PathLike[str] | None = None,
    *,
    backend: str = "eager",
    scheduler: Any = None,
    dynamic: bool | Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> DeepCacheUNet:
    """Returns a drop-in replacement for ``unet`` that runs DeepCache as two graphs.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` or ``UNet2DModel``. Its parameters are
            shared with the graphs, not copied.
        config: A ``DeepCacheConfig`` or the path of its JSON; or leave it None and pass its
            fields (``branch``, ``interval``, ``schedule``, ...) as keywords.
        backend: A registered backend (``dcfx.available_backends()``): "eager" or "inductor".
        scheduler: The pipeline's scheduler: the runtime then knows each generation's step
            index and step count from ``scheduler.timesteps`` (needed by the non-uniform
            schedule unless ``steps`` is set).
        dynamic: One graph pair for every size in ranges instead of one per input shape:
            ``True`` (batch 1-16, heights and widths from half to twice the model's size,
            prompts of 2-308 tokens, a transformer's 2-512) or ``{"batch": (min, max), "height": ..., "width": ...,
            "tokens": ...}`` as ``dcfx.export``'s ``shapes`` (an int is static; a prompt length
            left out is the first call's, static; so is a video transformer's ``"frames"``). Eager runs
            one symbolic capture; Inductor compiles ahead of time (AOTInductor). A call
            outside the ranges is refused with a ValueError naming the dimension.
        cache_dir: Inductor only: keep the graphs compiled ahead of time (AOTInductor
            packages) in this directory, keyed by the model's weights, config, branch, sizes
            and versions, so that another process with the same model and settings loads them
            instead of compiling (a warm start). Default: ``$DCFX_CACHE_DIR`` if set.
        **kwargs: DeepCacheConfig fields, then backend options (inductor: ``mode``, ``options``).

    Example:
        >>> pipe.unet = dcfx.compile(pipe.unet, branch=0, interval=5, scheduler=pipe.scheduler)
        >>> image = pipe(prompt).images[0]

    Raises:
        TypeError: unsupported model class, config and fields both given, unknown option.
        ValueError: branch out of range, bad schedule fields, a non-uniform schedule with no
            solution for ``steps``, unknown backend.
    """
    spec = model_spec(unet)
    cfg, kwargs = split_config_fields(config, kwargs)
    cfg = check_branch(unet, spec, cfg)
    check_capturable(unet)
    if cfg.schedule_spec.needs_step_count() and scheduler is None:
        raise ValueError(
            f"the {cfg.schedule} schedule needs the step count: pass scheduler=pipe.scheduler "
            "(or use dcfx.enable(pipe, ...)), or set steps= in the config"
        )
    if not cfg.schedule_spec.needs_step_count():
        schedule.plan(cfg)  # a schedule without a solution fails here, not at the first step
    get_backend(backend)
    check_options(backend, kwargs)
    build = make_build(
        BuildRequest(
            unet,
            cfg.cut,
            backend,
            dict(kwargs),
            _dynamic_dims(unet, spec, dynamic),
            cache_dir_from(cache_dir),
            _from_first_call(spec, unet, dynamic),
        )
    )
    return DeepCacheUNet(unet, cfg, spec, build, scheduler=scheduler)


def _from_first_call(spec: ModelSpec, unet: nn.Module, dynamic: bool | Mapping[str, Any] | None) -> tuple[str, ...]:
    # A prompt length the ranges leave out is the first call's, static (as an export takes its
    # example's): a model with 4 class tokens must not be held to CLIP's 77. So is a video's
    # frame count unless the ranges name it.
    takes_context = spec.context_input in spec.signature(unet).parameters
    names = ("tokens",) if isinstance(dynamic, Mapping) and "tokens" not in dynamic and takes_context else ()
    if FRAMES in spec.sample_dims and not (isinstance(dynamic, Mapping) and FRAMES in dynamic):
        names = (*names, FRAMES)
    return names


def _dynamic_dims(
    unet: nn.Module, spec: ModelSpec, dynamic: bool | Mapping[str, Any] | None
) -> dict[str, DimRange] | None:
    """Returns the ranges of ``dynamic=`` as the model's inputs carry them (None: static shapes).

    Image U-Nets and transformers take batch, height, width (latent pixels, multiples of the
    downsampling factor or patch size) and tokens (the prompt's length); a transformer on
    packed tokens (Flux) takes heights and widths too, carried as one count of image tokens
    (``dcfx.export.axes.model_dims``); a video transformer (Wan) also takes frames (latent
    frames; the first call's unless named). Video U-Nets are refused.
    """
    if dynamic is None or dynamic is False:
        return None
    if FRAMES in spec.sample_dims and not isinstance(spec, TransformerSpec):
        raise TypeError(
            f"dynamic= takes image U-Nets and transformers; {type(unet).__name__} is a video U-Net taking "
            f"({', '.join(spec.sample_dims)}): compile it with static shapes"
        )
    if dynamic is not True and not isinstance(dynamic, Mapping):
        raise TypeError(f"dynamic must be True or a mapping of dimension ranges, got {dynamic!r}")
    multiple = spatial_multiple(unet)
    size = spec.default_size(unet)
    ranges = dict(DYNAMIC_DEFAULTS) if dynamic is True else {}
    if dynamic is True and isinstance(spec, TransformerSpec):
        ranges["tokens"] = TRANSFORMER_TOKENS
    ranges["height"] = ranges["width"] = default_side_range(size, multiple)
    ranges.update(dict(dynamic) if isinstance(dynamic, Mapping) else {})
    takes_context = spec.context_input in spec.signature(unet).parameters
    if not takes_context:
        ranges.pop("tokens", None)
    tokens = 77 if takes_context else None
    frames = 1 if FRAMES in spec.sample_dims else None  # the first call's, unless the ranges name them
    dims = parse_dims(ranges, size, multiple, tokens=tokens, frames=frames, frame_multiple=frame_multiple(unet))
    return model_dims(unet, dims)


def enable(pipe: Any, config: DeepCacheConfig | str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """Returns ``pipe`` with its denoiser (``pipe.unet``, or ``pipe.transformer``) compiled by dcfx.

    The runtime reads ``pipe.scheduler`` as it is at each call: a scheduler replaced
    afterwards (``pipe.scheduler = EulerDiscreteScheduler.from_config(...)``) is followed.
    When ``pipe.unet`` is already a runtime bound to another pipeline (two pipelines made
    from one set of components, such as an SDXL base and its refiner) and the settings are
    the same (or none are given), ``pipe`` is bound to that runtime too: one set of graphs,
    and each pipeline's calls counted by its own scheduler.
    """
    attr = denoiser_attribute(pipe)
    runtime = getattr(pipe, attr)
    if isinstance(runtime, DeepCacheUNet):
        follows = runtime.scheduler if isinstance(runtime.scheduler, PipelineScheduler) else None
        if follows is not None and not follows.binds(pipe) and _same_settings(runtime, config, kwargs):
            # A runtime another pipeline shares (an SDXL refiner made from the base's components):
            # bound to this pipeline too, its graphs serve both.
            follows.add(pipe)
            return pipe
        disable(pipe)
    setattr(pipe, attr, compile(getattr(pipe, attr), config, scheduler=PipelineScheduler(pipe), **kwargs))
    return pipe


def denoiser_attribute(pipe: Any) -> str:
    """Returns the name of the pipeline's denoiser: ``"unet"``, or ``"transformer"`` for a DiT pipeline.

    Raises:
        TypeError: the pipeline has neither.
    """
    for attr in ("unet", "transformer"):
        if getattr(pipe, attr, None) is not None:
            return attr
    raise TypeError(f"{type(pipe).__name__} has no unet or transformer for dcfx to compile")


def _same_settings(runtime: DeepCacheUNet, config: Any, kwargs: dict[str, Any]) -> bool:
    """Returns whether ``enable``'s arguments ask for what ``runtime`` already is (no config: yes)."""
    if config is None and not kwargs:
        return True
    try:
        cfg, rest = split_config_fields(config, kwargs)
    except (TypeError, ValueError):
        return False
    return not rest and cfg == runtime.deepcache_config


def disable(pipe: Any) -> Any:
    """Returns ``pipe`` with its original U-Net back (a no-op when dcfx is not enabled).

    Raises:
        TypeError: ``pipe.unet`` came from ``dcfx.load``: there is no original U-Net to restore.
    """
    attr = denoiser_attribute(pipe)
    runtime = getattr(pipe, attr)
    if isinstance(runtime, DeepCacheUNet):
        from dcfx.export.loaded import ExportedModel

        if isinstance(runtime.model, ExportedModel):
            kind = "U-Net" if attr == "unet" else "transformer"
            raise TypeError(
                f"pipe.{attr} was loaded from an export (dcfx.load): there is no original {kind} to restore"
            )
        setattr(pipe, attr, runtime.model)
    return pipe
