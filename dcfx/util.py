"""Small helpers every layer uses: argument checks, JSON-able values, a digest of a model's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raises TypeError unless ``value`` is an int (not a bool), ValueError if it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def jsonable(value: Any) -> Any:
    """Returns ``value`` with mappings, lists and plain scalars kept and anything else as its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def weights_digest(model: nn.Module) -> str:
    """Returns a digest of every parameter and buffer of ``model``: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            data = tensor.detach().contiguous().cpu()
            h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()
