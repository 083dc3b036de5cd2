"""0-d tensors of per-call values (the LoRA scale, the forecast coefficient), made once each.

A step that turned a host float into a GPU tensor with a plain copy would synchronise with
the device; the tensors here are made once per value, dtype and device and kept (bounded). On
CUDA the copy comes from pinned memory without blocking (PyTorch's pinned-memory allocator
keeps the source alive until the copy is done).
"""

from __future__ import annotations

import torch

_SCALARS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}
MAX_SCALARS = 4096


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Returns a 0-d tensor holding ``value`` (the same tensor for the same value, dtype and device)."""
    key = (value, dtype, device)
    tensor = _SCALARS.get(key)
    if tensor is None:
        if len(_SCALARS) >= MAX_SCALARS:
            _SCALARS.clear()
        host = torch.tensor(value, dtype=dtype)
        if device.type == "cuda":
            tensor = host.pin_memory().to(device, non_blocking=True)
        else:
            tensor = host.to(device)
        _SCALARS[key] = tensor
    return tensor
