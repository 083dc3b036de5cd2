"""What the public verbs check first: the config, the model's spec and the branch.

The config comes as an object, a JSON path or keyword fields. ``dcfx.compile`` and
``dcfx.export`` read their arguments here, so both refuse the same inputs with the same
messages.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from dcfx.config import DeepCacheConfig
from dcfx.models import ModelSpec, TransformerSpec, spec_for
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


def check_branch(unet: nn.Module, spec: ModelSpec, cfg: DeepCacheConfig) -> DeepCacheConfig:
    """Returns ``cfg`` for ``unet``'s kind of cut; raises ValueError for a cut the model does not have.

    A U-Net takes a ``branch`` in range; a transformer ``first`` and ``last`` that leave blocks
    to cache (a config that names neither gets ``first=1, last=0``). The other kind's knobs are
    refused by name.
    """
    if isinstance(spec, TransformerSpec):
        cfg = cfg.for_transformer()
        spec.block_range(unet, *cfg.cut)  # type: ignore[misc]  (raises, naming the block count)
        return cfg
    if cfg.first is not None:
        raise ValueError(
            f"first={cfg.first}, last={cfg.last} cut a diffusion transformer at a block range; {type(unet).__name__} "
            "is a U-Net: cut it at a skip branch with branch= (see dcfx.branches(unet))"
        )
    n_branches = len(spec.up_layers(unet))
    if cfg.branch >= n_branches:
        raise ValueError(
            f"branch {cfg.branch} is out of range for {type(unet).__name__} with {n_branches} up layers; "
            f"valid branch ids: 0..{n_branches - 1} (see dcfx.branches(unet))"
        )
    return cfg
