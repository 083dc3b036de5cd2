"""Generation requests, their results, and the errors the engine answers with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from dcfx.util import check_int


class QueueFull(RuntimeError):
    """The engine's queue is full: the request was refused at once (HTTP 503); retry later."""


class EngineStopped(RuntimeError):
    """The engine stopped before the request finished, or refuses new requests while it stops."""


def check_sampling(scheduler: object, interval: object, forecast: object) -> None:
    """Raises TypeError/ValueError for a request's bad scheduler kind, interval or forecast name."""
    if not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be a scheduler kind (a name), got {scheduler!r}")
    if interval is not None:
        check_int("interval", interval, 1)
    if forecast is not None and not isinstance(forecast, str):
        raise TypeError(f"forecast must be a forecast's name, got {forecast!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One generation: what it is conditioned on, its noise seed and its sampling settings.

    A request makes one image per label (or per row of its conditioning); with
    classifier-free guidance (``guidance`` > 1) each image takes two U-Net rows, conditional
    then unconditional, as diffusers pipelines batch them.

    Attributes:
        labels: Class ids, for the bundled digits model (``dcfx.digits``): one image each.
        conditioning: U-Net keyword inputs with one row per image, for other models, e.g.
            ``{"encoder_hidden_states": (B, tokens, dim)}``.
        negative_conditioning: The unconditional inputs of classifier-free guidance, same keys
            and shapes as ``conditioning`` (needed when ``guidance`` > 1 with ``conditioning``).
        seed: Seeds the initial noise: the same request and seed give the same image.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale; 1 runs the conditional rows only.
        size: (height, width) of the U-Net's sample; None: the model's ``sample_size``.
        scheduler: A registered scheduler kind (``dcfx.serve.available_schedulers()``): ddim, dpm, euler,
            flow (flow-matching Euler: SD3, Flux); a served pipeline also takes "pipeline" (its own).
        interval: DeepCache's N for this request, among those the engine offers (``Engine.choices``);
            None: the engine's default.
        forecast: The forecast for this request, among those the engine offers; None: the default.

    Example:
        >>> GenerationRequest(labels=(3,), seed=7, steps=50)
    """

    labels: tuple[int, ...] | None = None
    conditioning: Mapping[str, torch.Tensor] | None = None
    negative_conditioning: Mapping[str, torch.Tensor] | None = None
    seed: int = 0
    steps: int = 50
    guidance: float = 1.0
    size: tuple[int, int] | None = None
    scheduler: str = "ddim"
    interval: int | None = None
    forecast: str | None = None

    def __post_init__(self) -> None:
        if self.labels is not None:
            labels = tuple(self.labels)
            if not labels or any(isinstance(v, bool) or not isinstance(v, int) for v in labels):
                raise TypeError(f"labels must be a non-empty sequence of ints, got {self.labels!r}")
            object.__setattr__(self, "labels", labels)
        if self.labels is not None and self.conditioning is not None:
            raise ValueError("give either labels (the digits model) or conditioning tensors, not both")
        for name in ("conditioning", "negative_conditioning"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim >= 1 for k, v in value.items()
            ):
                raise TypeError(f"{name} must map input names to tensors with a leading row dimension, got {value!r}")
        if self.negative_conditioning is not None and self.conditioning is None:
            raise ValueError("negative_conditioning needs conditioning")
        check_int("seed", self.seed, 0)
        check_int("steps", self.steps, 1)
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise TypeError(f"guidance must be a number >= 1, got {self.guidance!r}")
        if not math.isfinite(self.guidance) or self.guidance < 1:
            raise ValueError(
                f"guidance must be a finite number >= 1 (1: no classifier-free guidance), got {self.guidance}"
            )
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            if len(size) != 2:
                raise ValueError(f"size must be an int or (height, width), got {self.size!r}")
            for side in size:
                check_int("size", side, 1)
            object.__setattr__(self, "size", size)
        check_sampling(self.scheduler, self.interval, self.forecast)

    @property
    def guided(self) -> bool:
        """Whether the request runs classifier-free guidance (two U-Net rows per image)."""
        return self.guidance > 1


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationResult:
    """A finished generation: its final sample and how it ran.

    Attributes:
        request_id: The id ``Engine.submit`` gave the request.
        latents: The final sample (images, sample channels, height, width), float32 on the CPU;
            for the digits model the images themselves, in [-1, 1].
        full_steps: Steps that ran in a full-graph call.
        shallow_steps: Steps that ran in a shallow-graph call.
        waited_ticks: Engine ticks the request waited before its first step (queue and alignment).
        start_tick: The engine tick of its first step.
        end_tick: The engine tick of its last step.
        submitted_s: ``time.perf_counter()`` when it was submitted.
        finished_s: ``time.perf_counter()`` when its last step finished.
    """

    request_id: int
    latents: torch.Tensor
    full_steps: int
    shallow_steps: int
    waited_ticks: int
    start_tick: int
    end_tick: int
    submitted_s: float
    finished_s: float

    @property
    def latency_s(self) -> float:
        """Seconds from submission to the last step."""
        return self.finished_s - self.submitted_s
