"""The serving engine's generations in flight, and the cohorts of them that may share a call.

A ``Generation`` is one request being denoised: its scheduler state, latents, step and plan
(``dcfx.planner``), whose anchors say where its cache rows are (``dcfx.serve.rows``). A
``Cohort`` gathers the generations of one ``cohort_key`` (scheduler, sample size and
conditioning layout; for a transformer that is its image tokens and prompt tokens, and the
inputs every row shares): their steps can run as rows of one batched call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from dcfx.backends import CompiledPair
from dcfx.planner import GenerationPlan
from dcfx.serve.models import PreparedRequest
from dcfx.serve.request import GenerationRequest, GenerationResult
from dcfx.serve.rows import BufferPool


class Generation:
    """One request in flight: its scheduler state, latents, step, and where its cache rows are."""

    def __init__(
        self,
        rid: int,
        request: GenerationRequest,
        prepared: PreparedRequest,
        scheduler: Any,
        plan: GenerationPlan,
        key: tuple[Any, ...],
        future: Future[GenerationResult],
        tick: int,
    ) -> None:
        self.id = rid
        self.request = request
        self.cond = prepared.conditioning
        self.prepared = prepared
        self.rows = prepared.rows
        self.scheduler = scheduler
        scheduler.set_timesteps(request.steps)
        self.timesteps = list(scheduler.timesteps)  # 0-d tensors, as a pipeline's loop passes them
        self.positions = [float(t) for t in self.timesteps]  # the steps on the sampler's time axis
        # Flow-matching schedulers have no init_noise_sigma and no scale_model_input: identities.
        self.x = prepared.noise * getattr(scheduler, "init_noise_sigma", 1.0)
        self.plan = plan
        self.key = key
        self.future = future
        self.step = 0
        self.full_steps = 0
        self.shallow_steps = 0
        self.arrived_tick = tick
        self.start_tick = -1
        self.submitted_s = time.perf_counter()
        self.on_step: Callable[[int, int, bool], None] | None = None  # Engine.submit's progress listener

    @property
    def steps(self) -> int:
        """The number of denoising steps of this generation."""
        return len(self.timesteps)

    @property
    def position(self) -> float:
        """This step's place on the sampler's time axis (its timestep), as the runtime reads it."""
        return self.positions[self.step]

    def next_full(self) -> int | None:
        """Returns the steps until this generation's next full step (None: it has none left)."""
        step = self.plan.next_full(self.step, self.steps)
        return None if step is None else step - self.step

    def model_input(self) -> torch.Tensor:
        """Returns its model rows of this step: (rows, C, H, W), or a transformer's sample layout."""
        x = self.x
        if hasattr(self.scheduler, "scale_model_input"):
            x = self.scheduler.scale_model_input(x, self.timesteps[self.step])
        return torch.cat([x, x]) if self.request.guided else x

    def advance(self, out: torch.Tensor) -> None:
        """Takes the scheduler step with the model's output rows ``out``."""
        eps = self.prepared.prediction(out)
        if self.request.guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + self.request.guidance * (eps_cond - eps_uncond)
        self.x = self.scheduler.step(eps, self.timesteps[self.step], self.x).prev_sample
        self.step += 1


class Cohort:
    """Generations that may share a call: one scheduler, sample size and conditioning layout."""

    def __init__(self, key: tuple[Any, ...], capacity: int) -> None:
        self.key = key
        self.running: list[Generation] = []
        self.pool = BufferPool(capacity)
        self.scratch: dict[str, torch.Tensor] = {}  # anchor -> gathered cache rows of a shallow call
        self.pairs: dict[int, CompiledPair] = {}  # batch size -> the pair last used for it

    @property
    def rows(self) -> int:
        """The U-Net rows of its running generations together."""
        return sum(g.rows for g in self.running)

    def ticks_to_next_full(self) -> int | None:
        """Returns the ticks until some running generation takes a full step (None: none will)."""
        waits = [w for w in (g.next_full() for g in self.running) if w is not None]
        return min(waits) if waits else None


def cohort_key(request: GenerationRequest, prepared: PreparedRequest) -> tuple[Any, ...]:
    """Returns what generations must share to run in one call: scheduler, sample and conditioning layout.

    The sample's shape holds a transformer's image tokens (its latent size), the conditioning's
    its prompt tokens; the inputs every row shares (Flux's token positions) must be equal.
    """
    sample = prepared.noise
    cond = tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in prepared.conditioning.items()))
    key = (request.scheduler, tuple(sample.shape[1:]), sample.dtype, str(sample.device), cond)
    return (*key, prepared.shared_key()) if prepared.shared else key
