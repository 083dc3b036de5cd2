"""The state that the passes share: what was captured and where the branch is cut."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dcfx.models import ModelSpec, UpLayer


@dataclass
class PassContext:
    """Facts about one capture that the passes read and record.

    Attributes:
        model: The wrapped U-Net (the owner of every parameter).
        spec: Its ``ModelSpec``.
        input_names: The flat graph inputs, in placeholder order.
        layer: The up layer whose input is cached (set from the branch id).
        feature: Name of the graph node holding the cache feature (set by ``find_cache_feature``).
        module_prefix: The prefix of the U-Net's module paths in ``nn_module_stack``.
    """

    model: nn.Module
    spec: ModelSpec
    input_names: tuple[str, ...]
    layer: UpLayer
    feature: str | None = None
    module_prefix: str = "unet."
