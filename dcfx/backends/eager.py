"""The eager backend: the partitioned GraphModules, run as they are."""

from __future__ import annotations

from typing import Any

import torch

from dcfx.backends import CompiledPair, register_backend
from dcfx.passes import forget_graphs


@register_backend("eager")
def eager(
    full: torch.nn.Module,
    shallow: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    forecast: torch.nn.Module | None = None,
    **options: Any,
) -> CompiledPair:
    """Returns the graphs themselves, ready as they are (``example_inputs`` not needed); takes no options."""
    graphs = [g for g in (full, shallow, forecast) if g is not None]
    return CompiledPair(
        full=full,
        shallow=shallow,
        forecast=forecast,
        release=lambda: forget_graphs(*graphs),
        follows_values=True,
    )
