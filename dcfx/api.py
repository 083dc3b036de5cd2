"""The public verbs: compile, enable, disable."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from dcfx import schedule
from dcfx.backends import CompiledPair, check_options, compile_lock, get_backend
from dcfx.config import DeepCacheConfig
from dcfx.models import ModelSpec, spec_for
from dcfx.passes import build_graph_pair
from dcfx.runtime import DeepCacheUNet

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


def compile(  # noqa: A001  (the public verb shadows the builtin inside this module only)
    unet: nn.Module,
    config: DeepCacheConfig | str | os.PathLike[str] | None = None,
    *,
    backend: str = "eager",
    scheduler: Any = None,
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
    if cfg.schedule_spec.needs_step_count() and scheduler is None:
        raise ValueError(
            f"the {cfg.schedule} schedule needs the step count: pass scheduler=pipe.scheduler "
            "(or use dcfx.enable(pipe, ...)), or set steps= in the config"
        )
    if not cfg.schedule_spec.needs_step_count():
        schedule.plan(cfg)  # a schedule without a solution fails here, not at the first step
    get_backend(backend)
    check_options(backend, kwargs)
    build = CaptureAndCompile(unet, cfg.branch, backend, dict(kwargs))
    return DeepCacheUNet(unet, cfg, spec, build, scheduler=scheduler)


@dataclasses.dataclass
class CaptureAndCompile:
    """Builds the graph pair of one input signature: capture, cut at ``branch``, compile.

    A plain object rather than a closure, so that a ``DeepCacheUNet`` pickles (the backend
    is looked up by name when a pair is built).
    """

    unet: nn.Module
    branch: int
    backend: str
    options: dict[str, Any]

    def __call__(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> CompiledPair:
        """Returns the compiled pair for inputs named ``names`` like ``tensors``."""
        with compile_lock:
            pair = build_graph_pair(self.unet, self.branch, names, tensors)
            return get_backend(self.backend)(pair.full, pair.shallow, tensors, **self.options)


def enable(pipe: Any, config: DeepCacheConfig | str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
    """Returns ``pipe`` with its U-Net compiled by dcfx and bound to its scheduler."""
    if isinstance(pipe.unet, DeepCacheUNet):
        disable(pipe)
    pipe.unet = compile(pipe.unet, config, scheduler=pipe.scheduler, **kwargs)
    return pipe


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
