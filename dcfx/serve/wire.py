"""The HTTP JSON API's bodies: a request from JSON, a result as PNG bytes or latents in JSON.

POST body (JSON object)::

    {"label": 3}                        # or "labels": [3, 1, 4]: one image each (digits model)
    {"conditioning": {"encoder_hidden_states": [[[...]]]},      # other models: nested lists,
     "negative_conditioning": {...}}                            # one row per image
    "seed": 0, "steps": 50, "guidance": 1.0, "size": 16 or [16, 24],
    "scheduler": "ddim" | "dpm" | "euler" | "flow", "output": "png" | "latents"

``output`` "png" (the default for image models) answers the images side by side as PNG bytes;
"latents" answers ``{"shape": [...], "dtype": "float32", "data": base64 of the little-endian
floats}`` (``decode_latents`` reads it back).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dcfx.serve.request import GenerationRequest

OUTPUTS = ("png", "latents")
REQUEST_KEYS = (
    "label",
    "labels",
    "conditioning",
    "negative_conditioning",
    "seed",
    "steps",
    "guidance",
    "size",
    "scheduler",
    "output",
)


def parse_request(payload: Any) -> tuple[GenerationRequest, str]:
    """Returns the request a JSON body describes and the output it asks for.

    Raises:
        ValueError, TypeError: a body that is not a request, naming the bad key or value.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"the request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown request key(s) {unknown}; valid: {', '.join(REQUEST_KEYS)}")
    if "label" in payload and "labels" in payload:
        raise ValueError("give either label or labels, not both")
    output = payload.get("output", "png")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    labels = payload.get("labels")
    if "label" in payload:
        labels = [payload["label"]]
    if labels is not None and not isinstance(labels, list):
        raise TypeError(f"labels must be a list of ints, got {labels!r}")
    size = payload.get("size")
    if isinstance(size, list):
        size = tuple(size)
    fields: dict[str, Any] = {
        "labels": tuple(labels) if labels is not None else None,
        "conditioning": _tensors("conditioning", payload.get("conditioning")),
        "negative_conditioning": _tensors("negative_conditioning", payload.get("negative_conditioning")),
        "size": size,
    }
    for key in ("seed", "steps", "guidance", "scheduler"):
        if key in payload:
            fields[key] = payload[key]
    return GenerationRequest(**fields), output


def _tensors(name: str, value: Any) -> dict[str, torch.Tensor] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a JSON object of input name -> nested list of numbers, got {value!r}")
    out = {}
    for key, data in value.items():
        try:
            tensor = torch.tensor(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}[{key!r}] must be a rectangular nested list of numbers: {e}") from None
        if tensor.dtype == torch.bool or tensor.ndim == 0:
            raise ValueError(f"{name}[{key!r}] must be a nested list of numbers with one row per image")
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def encode_latents(latents: torch.Tensor) -> dict[str, Any]:
    """Returns ``latents`` as JSON: shape, dtype float32, and the little-endian bytes in base64."""
    array = latents.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_latents(body: Mapping[str, Any]) -> torch.Tensor:
    """Returns the tensor ``encode_latents`` wrote."""
    if body.get("dtype") != "float32":
        raise ValueError(f"latents must be float32, got dtype {body.get('dtype')!r}")
    array = np.frombuffer(base64.b64decode(body["data"]), dtype="<f4").reshape(body["shape"])
    return torch.from_numpy(array.copy())
