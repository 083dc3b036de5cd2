"""The images API that clients and SDKs already speak: ``POST /v1/images/generations``.

Request body (JSON object)::

    {"prompt": "a red fox",                  # required
     "negative_prompt": "blurry",            # optional
     "n": 1,                                 # images, 1..MAX_IMAGES
     "size": "512x512",                      # WIDTHxHEIGHT in pixels (default: the pipeline's)
     "response_format": "b64_json",          # the only format ("url" is not served)
     "model": "...",                         # optional; must name the served model if given
     "user": "...",                          # accepted, not used
     "stream": false,                        # true: server-sent events, one per step
     # dcfx's own:
     "seed": 0, "steps": 50, "guidance": 7.5, "scheduler": "pipeline",
     "interval": 3, "forecast": "none"}      # among the settings the server offers

Answer (``response_body``)::

    {"created": 1733400000, "data": [{"b64_json": "<PNG, base64>"}],
     "dcfx": {"seed": 0, "full_steps": 17, "shallow_steps": 33, "interval": 3, "forecast": "none", ...}}

With ``"stream": true`` the answer is ``text/event-stream``: a ``{"type": "progress", "step",
"total", "kind": "full" | "shallow"}`` event after each denoising step, then one
``{"type": "image_generation.completed", "index", "b64_json"}`` per image, then a
``{"type": "done", "dcfx": {...}}`` event and ``data: [DONE]``. An error after the stream began
comes as ``{"type": "error", "error": {"message", "code"}}``.

Errors answer ``{"error": {"message": ..., "type": ..., "code": status}}`` with dcfx's status
codes: 400 (bad request, naming the key), 404 (no such route or model), 503 (busy, shutting
down), 504 (took too long).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from dcfx.serve.request import check_sampling
from dcfx.util import check_int

ROUTE = "/v1/images/generations"
MAX_IMAGES = 8
REQUEST_KEYS = (
    "prompt",
    "negative_prompt",
    "n",
    "size",
    "response_format",
    "model",
    "user",
    "stream",
    "seed",
    "steps",
    "guidance",
    "scheduler",
    "interval",
    "forecast",
)
MAX_SEED = 2**31 - 1


class NotServedByPrompt(LookupError):
    """The server's model is not a pipeline served by prompt (HTTP 404 on the images route)."""


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """One images-API request: a prompt, how many images, their size, and the sampling settings.

    Attributes:
        prompt: What to draw.
        negative_prompt: What guidance steers away from (None: the empty prompt, as pipelines do).
        n: Images of the prompt (the pipeline's ``num_images_per_prompt``).
        size: (height, width) in pixels; None: the pipeline's default.
        seed: Seeds the initial noise of all ``n`` images (drawn at random when not given; the
            answer reports it).
        steps: Denoising steps (None: the pipeline's default).
        guidance: Classifier-free guidance scale (None: the pipeline's default; 1: none).
        scheduler: "pipeline" (the folder's own) or a registered kind (``available_schedulers``).
        interval: DeepCache's N among those the server offers (None: its default).
        forecast: The forecast among those the server offers (None: its default).
        stream: Answer with server-sent events per step.
    """

    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    size: tuple[int, int] | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str = "pipeline"
    interval: int | None = None
    forecast: str | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        check_int("n", self.n, 1)
        if self.n > MAX_IMAGES:
            raise ValueError(f"n must be at most {MAX_IMAGES}, got {self.n}")
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbelow(MAX_SEED))
        check_int("seed", self.seed, 0)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        if self.guidance is not None:
            if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 1:
                raise ValueError(
                    f"guidance must be a number >= 1 (1: no classifier-free guidance), got {self.guidance!r}"
                )
        check_sampling(self.scheduler, self.interval, self.forecast)
        if not isinstance(self.stream, bool):
            raise TypeError(f"stream must be true or false, got {self.stream!r}")


def parse_size(value: Any) -> tuple[int, int]:
    """Returns (height, width) of an images-API size "WIDTHxHEIGHT" (ValueError otherwise)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'size must be a string WIDTHxHEIGHT in pixels such as "512x512", got {value!r}')
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {value!r}")
    return height, width


def parse_images_request(payload: Any, model: str | None = None) -> ImageRequest:
    """Returns the request an images-API body describes.

    Args:
        payload: The decoded JSON body.
        model: The served model's name; a body naming another ``model`` is refused.

    Raises:
        ValueError, TypeError: a body that is not such a request, naming the bad key or value.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"the request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown request key(s) {unknown}; valid: {', '.join(REQUEST_KEYS)}")
    if "prompt" not in payload:
        raise ValueError("prompt is required")
    response_format = payload.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise ValueError(
            f"response_format must be 'b64_json' (this server does not host image URLs), got {response_format!r}"
        )
    named = payload.get("model")
    if named is not None and model is not None and named not in (model, model.rstrip("/").rsplit("/", 1)[-1]):
        raise ValueError(f"this server serves the model {model!r}, not {named!r} (leave model out, or name this one)")
    wire_only = ("size", "response_format", "model", "user")
    fields = {k: v for k, v in payload.items() if k not in wire_only and v is not None}
    if payload.get("size") is not None:
        fields["size"] = parse_size(payload["size"])
    return ImageRequest(**fields)


def response_body(pngs: list[bytes], info: Mapping[str, Any], created: int | None = None) -> dict[str, Any]:
    """Returns the images API's answer: ``created``, ``data`` (one ``b64_json`` per image) and dcfx's ``info``."""
    return {
        "created": int(time.time()) if created is None else created,
        "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs],
        "dcfx": dict(info),
    }


def error_body(status: int, message: str) -> dict[str, Any]:
    """Returns an error in the images API's shape, with dcfx's message and status code."""
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "server_busy", 504: "timeout"}.get(
        status, "server_error"
    )
    return {"error": {"message": message, "type": kind, "code": status}}


def event(data: Mapping[str, Any] | str) -> bytes:
    """Returns one server-sent event carrying ``data`` (JSON, or a bare string such as "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def progress_event(step: int, total: int, full: bool) -> dict[str, Any]:
    """Returns the event of a finished denoising step."""
    return {"type": "progress", "step": step, "total": total, "kind": "full" if full else "shallow"}


def image_events(pngs: list[bytes]) -> list[dict[str, Any]]:
    """Returns the events of the finished images, one per image."""
    return [
        {"type": "image_generation.completed", "index": i, "b64_json": base64.b64encode(png).decode("ascii")}
        for i, png in enumerate(pngs)
    ]
