"""A Ray Serve replica of ``dcfx serve``: ``Generator`` (the model, its engine, a pipeline's stages).

Also ``StatsBoard``, where replicas report their counters. ``dcfx.serve.app`` deploys both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

import dcfx
from dcfx.serve.engine import Engine
from dcfx.serve.images import (
    ImageRequest,
    NotServedByPrompt,
    event,
    image_events,
    parse_images_request,
    progress_event,
    response_body,
)
from dcfx.serve.models import DigitsServeModel
from dcfx.serve.options import ServeOptions
from dcfx.serve.pipeline import PipelineServeModel, load_served, prompt_servable
from dcfx.serve.request import GenerationRequest
from dcfx.serve.service import ImageResult, PipelineService
from dcfx.serve.wire import encode_latents, parse_request

logger = logging.getLogger(__name__)

REPORT_PERIOD_S = 0.5


class StatsBoard:
    """The latest counters each Generator replica reported."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, replica: str, stats: dict[str, Any]) -> None:
        """Records ``replica``'s counters."""
        self.reports[replica] = (time.monotonic(), stats)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Returns each replica's counters with the seconds since it reported them."""
        now = time.monotonic()
        return {r: {"age_s": round(now - t, 3), **stats} for r, (t, stats) in self.reports.items()}


class Generator:
    """A replica: the model compiled by dcfx and a step-batching engine running in a thread."""

    def __init__(self, options: ServeOptions, board: Any) -> None:
        import torch

        threads = options.threads or max(1, (os.cpu_count() or 1) // options.replicas)
        torch.set_num_threads(threads)  # this replica's process only
        model = load_served(options.model)
        runtime = dcfx.compile(model.unet, options.deepcache_config(), backend=options.backend)
        self.engine = Engine(runtime, model, options.engine_config(), choices=options.choices())
        if options.warmup and isinstance(model, DigitsServeModel):
            self.engine.warmup(GenerationRequest(labels=(0,), steps=1))
        # A pipeline served by prompt: its text encoder and VAE as stages around the engine.
        pipeline = isinstance(model, PipelineServeModel)
        self.service = PipelineService(model, self.engine, start=False) if pipeline else None
        if options.warmup and self.service is not None:
            self.service.warmup()
        if not self.engine.alive:
            self.engine.start()
        self.model = model
        self.why_not = "" if self.service is not None else prompt_servable(Path(options.model))[1]
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        self.board = board
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="dcfx-serve-report", daemon=True).start()

    def _report(self) -> None:
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                self.board.report.remote(self.replica, {"pid": self.pid, **self._stats()})
            except Exception:  # the board restarting: the next report goes through
                logger.debug("dcfx.serve: a stats report failed", exc_info=True)

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Returns the result of one request body: PNG bytes or encoded latents, and how it ran."""
        request, output = parse_request(payload)
        if output == "png" and not self.model.gives_images:
            raise ValueError(
                f"{self.model.name} gives latents only (its samples are not images): ask for output 'latents'"
            )
        future = self.engine.submit(request)
        result = await asyncio.wrap_future(future)
        reply: dict[str, Any] = {
            "replica": self.replica,
            "pid": self.pid,
            "request_id": result.request_id,
            "full_steps": result.full_steps,
            "shallow_steps": result.shallow_steps,
            "waited_ticks": result.waited_ticks,
            "latency_s": result.latency_s,
        }
        if output == "png":
            reply["png"] = self.model.png(result.latents)
        else:
            reply["latents"] = encode_latents(result.latents)
        return reply

    def stats(self) -> dict[str, Any]:
        """Returns this replica's engine counters (and a pipeline's stages')."""
        return {"replica": self.replica, "pid": self.pid, **self._stats()}

    def _stats(self) -> dict[str, Any]:
        return self.service.stats() if self.service is not None else self.engine.stats()

    def _service(self) -> PipelineService:
        if self.service is None:
            raise NotServedByPrompt(
                f"{self.model.name} is not served by prompt ({self.why_not}): use POST /generate with "
                "conditioning tensors, or serve a pipeline folder dcfx serves by prompt"
            )
        return self.service

    async def images(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Returns the images-API answer to one request body (``dcfx.serve.images``)."""
        service = self._service()
        request = parse_images_request(payload, self.model.name)
        result = await asyncio.wrap_future(service.submit(request))
        return response_body(result.pngs, self._info(request, result))

    async def images_stream(self, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yields the server-sent events of one request: progress per step, the images, then done."""
        service = self._service()
        request = parse_images_request(payload, self.model.name)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def on_step(step: int, total: int, full: bool) -> None:
            loop.call_soon_threadsafe(events.put_nowait, progress_event(step, total, full))

        future = service.submit(request, on_step)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        yield event({"type": "started", "seed": request.seed})
        while (item := await events.get()) is not None:
            yield event(item)
        try:
            result = future.result()
        except Exception as e:  # after the stream began: the error is an event
            yield event({"type": "error", "error": {"message": f"{type(e).__name__}: {e}", "code": 500}})
        else:
            for item in image_events(result.pngs):
                yield event(item)
            yield event({"type": "done", "dcfx": self._info(request, result)})
        yield event("[DONE]")

    def _info(self, request: ImageRequest, result: ImageResult) -> dict[str, Any]:
        interval, forecast = self.engine.setting(request.interval, request.forecast)
        gen = result.generation
        return {
            "seed": result.seed,
            "interval": interval,
            "forecast": forecast,
            "full_steps": gen.full_steps,
            "shallow_steps": gen.shallow_steps,
            "waited_ticks": gen.waited_ticks,
            "latency_s": round(gen.latency_s, 4),
            "replica": self.replica,
        }

    def check_health(self) -> None:
        """Raises when the engine's thread is gone (Serve then replaces the replica)."""
        if not self.engine.alive:
            raise RuntimeError("the dcfx engine thread of this replica stopped")

    def __del__(self) -> None:
        stop = self.__dict__.get("_stop")
        if stop is not None:
            stop.set()
            if self.__dict__.get("service") is not None:
                self.service.close(drain=True, timeout=10.0)
            else:
                self.engine.close(drain=True, timeout=10.0)
