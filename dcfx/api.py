"""The public verbs: compile, enable, disable."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dcfx import schedule
from dcfx.backends import check_options, get_backend
from dcfx.builds import AheadOfTime, CaptureAndCompile, RangedCapture, cache_dir_from
from dcfx.config import DeepCacheConfig
from dcfx.export.shapes import DimRange, parse_dims
from dcfx.hooks import check_capturable
from dcfx.models import ModelSpec, spec_for
from dcfx.runtime import DeepCacheUNet
from dcfx.steps import PipelineScheduler

_FIELDS = tuple(f.name for f in dataclasses.fields(DeepCacheConfig))


def resolve_config(config: DeepCacheConfig | str | os.PathLike[str] | None, fields: dict[str, Any]) -> DeepCacheConfig:
    """Returns the config given as an object, a JSON path, or as keyword fields (not both)."""
    if config is not None and fields:
        raise TypeError(
            f"pass either a DeepCacheConfig or its fields as keywords, not both (got config and {sorted(fields)})"
        )
    if config is None:
        return DeepCacheConfig(**fields)
    if isinstance(config, (str, os.PathLike)):
        return DeepCacheConfig.load(config)
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a DeepCacheConfig or a path to its JSON, got {type(config).__name__}")
    return config


def split_config_fields(
    config: DeepCacheConfig | str | os.PathLike[str] | None, kwargs: dict[str, Any]
) -> tuple[DeepCacheConfig, dict[str, Any]]:
    """Returns the config (object, JSON path or the DeepCacheConfig fields in ``kwargs``) and the other kwargs."""
    fields = {k: v for k, v in kwargs.items() if k in _FIELDS}
    rest = {k: v for k, v in kwargs.items() if k not in _FIELDS}
    return resolve_config(config, fields), rest


def model_spec(unet: nn.Module) -> ModelSpec:
    """Returns the ``ModelSpec`` of ``unet``; refuses a module dcfx already wraps."""
    if isinstance(unet, DeepCacheUNet):
        raise TypeError("this U-Net is already compiled by dcfx; pass the original (runtime.model)")
    return spec_for(unet)


def check_branch(unet: nn.Module, spec: ModelSpec, cfg: DeepCacheConfig) -> None:
    """Raises ValueError when ``cfg.branch`` is not a branch of ``unet``, naming the valid ids."""
    n_branches = len(spec.up_layers(unet))
    if cfg.branch >= n_branches:
        raise ValueError(
            f"branch {cfg.branch} is out of range for {type(unet).__name__} with {n_branches} up layers; "
            f"valid branch ids: 0..{n_branches - 1} (see dcfx.branches(unet))"
        )


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
            prompts of 2-308 tokens) or ``{"batch": (min, max), "height": ..., "width": ...,
            "tokens": ...}`` as ``dcfx.export``'s ``shapes`` (an int is static; a prompt length
            left out is the first call's, static). Eager runs
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
    check_branch(unet, spec, cfg)
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
    build = _build_for(unet, spec, cfg, backend, dict(kwargs), dynamic, cache_dir_from(cache_dir))
    return DeepCacheUNet(unet, cfg, spec, build, scheduler=scheduler)


def _build_for(
    unet: nn.Module,
    spec: ModelSpec,
    cfg: DeepCacheConfig,
    backend: str,
    options: dict[str, Any],
    dynamic: bool | Mapping[str, Any] | None,
    cache_dir: Path | None,
) -> Any:
    """Returns the build function ``compile`` hands the runtime (see ``dcfx.builds``)."""
    dims = _dynamic_dims(unet, spec, dynamic)
    if backend == "inductor" and (dims is not None or cache_dir is not None):
        if options.get("mode") is not None:
            raise TypeError(
                "inductor: mode= is a torch.compile setting; with dynamic= or cache_dir= the graphs are compiled "
                "ahead of time (AOTInductor): pass Inductor settings as options= instead"
            )
        aot = AheadOfTime(unet, cfg.branch, dims, cache_dir, dict(options.get("options") or {}))
        aot.from_first_call = _from_first_call(spec, unet, dynamic)
        return aot
    if cache_dir is not None:
        raise ValueError(
            f"cache_dir= keeps compiled graphs for the inductor backend; backend {backend!r} builds its graphs in "
            "seconds and keeps nothing on disk"
        )
    if dims is not None:
        if backend != "eager":
            raise ValueError(f"dynamic= takes backend 'eager' or 'inductor', got {backend!r}")
        ranged = RangedCapture(unet, cfg.branch, backend, options, dims)
        ranged.from_first_call = _from_first_call(spec, unet, dynamic)
        return ranged
    return CaptureAndCompile(unet, cfg.branch, backend, options)


def _from_first_call(spec: ModelSpec, unet: nn.Module, dynamic: bool | Mapping[str, Any] | None) -> tuple[str, ...]:
    # A prompt length the ranges leave out is the first call's, static (as an export takes its
    # example's): a model with 4 class tokens must not be held to CLIP's 77.
    takes_context = spec.context_input in spec.signature(unet).parameters
    if isinstance(dynamic, Mapping) and "tokens" not in dynamic and takes_context:
        return ("tokens",)
    return ()


def _dynamic_dims(
    unet: nn.Module, spec: ModelSpec, dynamic: bool | Mapping[str, Any] | None
) -> dict[str, DimRange] | None:
    if dynamic is None or dynamic is False:
        return None
    if len(spec.sample_dims) != 4:
        raise TypeError(f"dynamic= takes image U-Nets (4-d samples); {type(unet).__name__} takes video samples")
    if dynamic is not True and not isinstance(dynamic, Mapping):
        raise TypeError(f"dynamic must be True or a mapping of dimension ranges, got {dynamic!r}")
    factor = spec.downsampling_factor(unet)
    size = spec.default_size(unet)
    ranges = dict(DYNAMIC_DEFAULTS) if dynamic is True else {}
    ranges["height"] = ranges["width"] = (max(factor, size // 2 // factor * factor), size, 2 * size)
    ranges.update(dict(dynamic) if isinstance(dynamic, Mapping) else {})
    takes_context = spec.context_input in spec.signature(unet).parameters
    if not takes_context:
        ranges.pop("tokens", None)
    tokens = 77 if takes_context else None
    return parse_dims(ranges, size, factor, tokens=tokens)


def enable(pipe: Any, config: DeepCacheConfig | str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """Returns ``pipe`` with its U-Net compiled by dcfx and bound to its scheduler.

    The runtime reads ``pipe.scheduler`` as it is at each call: a scheduler replaced
    afterwards (``pipe.scheduler = EulerDiscreteScheduler.from_config(...)``) is followed.
    When ``pipe.unet`` is already a runtime bound to another pipeline (two pipelines made
    from one set of components, such as an SDXL base and its refiner) and the settings are
    the same (or none are given), ``pipe`` is bound to that runtime too: one set of graphs,
    and each pipeline's calls counted by its own scheduler.
    """
    runtime = pipe.unet
    if isinstance(runtime, DeepCacheUNet):
        follows = runtime.scheduler if isinstance(runtime.scheduler, PipelineScheduler) else None
        if follows is not None and not follows.binds(pipe) and _same_settings(runtime, config, kwargs):
            # A runtime another pipeline shares (an SDXL refiner made from the base's components):
            # bound to this pipeline too, its graphs serve both.
            follows.add(pipe)
            return pipe
        disable(pipe)
    pipe.unet = compile(pipe.unet, config, scheduler=PipelineScheduler(pipe), **kwargs)
    return pipe


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
    if isinstance(pipe.unet, DeepCacheUNet):
        from dcfx.export.loaded import ExportedModel

        if isinstance(pipe.unet.model, ExportedModel):
            raise TypeError("pipe.unet was loaded from an export (dcfx.load): there is no original U-Net to restore")
        pipe.unet = pipe.unet.model
    return pipe
