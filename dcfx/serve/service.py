"""A pipeline served by prompt: text encoder, denoising engine and VAE as three batching stages.

``PipelineService.submit(ImageRequest)`` returns a future of the request's PNG images. The
request's prompt and negative prompt go to the text-encoder stage (one call for the texts of
every request waiting, each distinct text encoded once); its conditioning rows then to the
step-batching engine; its final latents to the VAE stage (one call for the results of one size
waiting). Each stage runs in a thread of its own, so a request's decoding overlaps other
requests' denoising.

What a request gets equals the pipeline run offline with the same dcfx config, seed, prompt
and settings (``tests/serve/test_pipeline_serving.py``), up to the kernels' rounding by batch
size (one level of an 8-bit pixel at most where it shows; see docs/serving.md).

Example:
    >>> model = load_pipeline(Path("my-sd-folder"))
    >>> runtime = dcfx.compile(model.unet, branch=0, interval=3)
    >>> service = PipelineService(model, Engine(runtime, model))
    >>> pngs = service.submit(ImageRequest(prompt="a red fox", seed=1)).result().pngs
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from dcfx.serve.engine import Engine
from dcfx.serve.images import ImageRequest
from dcfx.serve.pipeline import PipelineServeModel
from dcfx.serve.request import GenerationRequest, GenerationResult
from dcfx.serve.stages import BatchStage

__all__ = ["ImageResult", "PipelineService"]

Progress = Callable[[int, int, bool], None]


@dataclasses.dataclass(frozen=True)
class ImageResult:
    """A finished image request: one PNG per image, and how its denoising ran.

    Attributes:
        pngs: The images, PNG-encoded, in order (``n`` of them).
        seed: The seed of the initial noise (the request's, or the one drawn for it).
        generation: The engine's result of its denoising (steps, ticks, latency).
    """

    pngs: list[bytes]
    seed: int
    generation: GenerationResult


class PipelineService:
    """Serves ``model`` by prompt: its text encoder and VAE in batching stages around ``engine``.

    Args:
        model: The pipeline (``dcfx.serve.pipeline.load_pipeline``).
        engine: The step-batching engine over ``dcfx.compile(model.unet, ...)``.
        max_items: Requests per text-encoder or VAE call at most (default: the engine's
            ``max_batch``).
        start: Start the engine's thread now (False: the caller starts it, after ``warmup``).
    """

    def __init__(
        self, model: PipelineServeModel, engine: Engine, max_items: int | None = None, start: bool = True
    ) -> None:
        if engine.model is not model:
            raise ValueError("engine must serve model: Engine(dcfx.compile(model.unet, ...), model)")
        self.model = model
        self.engine = engine
        items = max_items or engine.config.max_batch
        self.encoder: BatchStage[list[str], list[dict[str, torch.Tensor]]] = BatchStage(
            "text encoder", self._encode, max_items=items
        )
        self.decoder: BatchStage[torch.Tensor, list[Any]] = BatchStage(
            "VAE decoder", model.decode, max_items=items, key=lambda x: (tuple(x.shape[1:]), x.dtype)
        )
        if start and not engine.alive:
            engine.start()

    def texts(self, request: ImageRequest) -> list[str]:
        """Returns the texts the request needs encoded: its prompt, then (guided) its negative prompt.

        A guided request without a negative prompt has the empty prompt's rows, or zeros where
        the pipeline guides so (SDXL's ``force_zeros_for_empty_prompt``).
        """
        texts = [request.prompt]
        if self.guidance(request) > 1 and not (
            request.negative_prompt is None and self.model.family.zero_negative(self.model.pipe)
        ):
            texts.append(request.negative_prompt or "")
        return texts

    def generation_request(self, request: ImageRequest, rows: list[dict[str, torch.Tensor]]) -> GenerationRequest:
        """Returns the engine's request for ``request`` given the rows of its ``texts``."""
        height, width = request.size or self.model.image_size()
        n = request.n
        family = self.model.family
        sized = family.size_inputs(self.model.pipe, height, width) if family.size_inputs else {}
        cond = {**rows[0], **sized}
        negative = None
        if self.guidance(request) > 1:
            texts = rows[1] if len(rows) > 1 else {k: torch.zeros_like(v) for k, v in rows[0].items()}
            negative = {k: v.repeat_interleave(n, dim=0) for k, v in {**texts, **sized}.items()}
        cond = {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}  # num_images_per_prompt
        return GenerationRequest(
            conditioning=cond,
            negative_conditioning=negative,
            seed=request.seed,
            steps=request.steps or self.model.family.steps,
            guidance=self.guidance(request),
            size=self.model.latent_size(height, width),
            scheduler=request.scheduler,
            interval=request.interval,
            forecast=request.forecast,
        )

    def warmup(self, request: ImageRequest | None = None) -> None:
        """Builds the denoiser's graph pairs that requests like ``request`` need at each batch size.

        Default: the pipeline's default size, guidance and scheduler. Runs the text encoder once;
        serving then starts without a capture on the first request.
        """
        request = request or ImageRequest(prompt="warm-up", seed=0, steps=1)
        self.check(request)
        self.engine.warmup(self.generation_request(request, self.model.encode(self.texts(request))))

    def guidance(self, request: ImageRequest) -> float:
        """Returns the request's guidance scale (the pipeline's default when it names none)."""
        return self.model.family.guidance if request.guidance is None else request.guidance

    def check(self, request: ImageRequest) -> None:
        """Raises ValueError/TypeError for a request this service cannot run, before any work."""
        height, width = request.size or self.model.image_size()
        self.model.latent_size(height, width)
        self.model.check_scheduler(request.scheduler)
        self.engine.setting(request.interval, request.forecast)
        least = self.model.family.min_steps
        if request.steps is not None and request.steps < least:
            raise ValueError(f"{type(self.model.pipe).__name__} takes at least {least} steps, got {request.steps}")
        rows = request.n * (2 if self.guidance(request) > 1 else 1)
        if rows > self.engine.config.max_batch:
            raise ValueError(
                f"n={request.n} needs {rows} denoiser rows per step, more than max_batch {self.engine.config.max_batch}"
            )

    def submit(self, request: ImageRequest, on_step: Progress | None = None) -> Future[ImageResult]:
        """Queues ``request``; returns the future of its images.

        ``on_step(step, steps, full)`` is called in the engine's thread after each denoising step.

        Raises:
            ValueError, TypeError: a request this service cannot run (nothing was queued).
            QueueFull, EngineStopped: as ``Engine.submit`` (raised through the future when the
                text encoding ran first).
        """
        self.check(request)
        result: Future[ImageResult] = Future()
        texts = self.texts(request)

        def encoded(future: Future[list[dict[str, torch.Tensor]]]) -> None:
            try:
                generation = self.engine.submit(self.generation_request(request, future.result()), on_step)
            except BaseException as e:
                result.set_exception(e)
                return
            generation.add_done_callback(denoised)

        def denoised(future: Future[GenerationResult]) -> None:
            try:
                gen = future.result()
                self.decoder.submit(gen.latents).add_done_callback(lambda f: decoded(f, gen))
            except BaseException as e:
                result.set_exception(e)

        def decoded(future: Future[list[Any]], gen: GenerationResult) -> None:
            try:
                result.set_result(ImageResult([_png(image) for image in future.result()], request.seed, gen))
            except BaseException as e:
                result.set_exception(e)

        self.encoder.submit(texts).add_done_callback(encoded)
        return result

    def stats(self) -> dict[str, Any]:
        """Returns the engine's counters and the two stages', flat (as /stats sums them).

        The stages': ``text_encoder_calls``, ``..._items``, ``..._items_per_call``, ``..._waiting``,
        ``..._failed_calls``; ``vae_decoder_...`` alike.
        """
        out = self.engine.stats()
        for prefix, stage in (("text_encoder", self.encoder), ("vae_decoder", self.decoder)):
            out.update({f"{prefix}_{k}": v for k, v in stage.stats().items()})
        return out

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops the stages and the engine (``Engine.close``): queued work finishes when ``drain``."""
        self.encoder.close(timeout)
        self.engine.close(drain=drain, timeout=timeout)
        self.decoder.close(timeout)

    def _encode(self, batches: list[list[str]]) -> list[list[dict[str, torch.Tensor]]]:
        """One text-encoder call for every request's texts; returns each request's rows."""
        rows = self.model.encode([text for texts in batches for text in texts])
        out, start = [], 0
        for texts in batches:
            out.append(rows[start : start + len(texts)])
            start += len(texts)
        return out


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
