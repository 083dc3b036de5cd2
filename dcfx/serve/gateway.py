"""The HTTP ingress of ``dcfx serve``: routes, retries on replica death, errors as status codes.

Routes: ``POST /generate`` (``dcfx.serve.wire``: labels or conditioning tensors in, PNG or
latents out), ``POST /v1/images/generations`` (``dcfx.serve.images``: a prompt in, base64 PNGs
or server-sent events out; pipelines served by prompt), ``GET /health``, ``GET /stats``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dcfx.serve.images import ROUTE as IMAGES_ROUTE
from dcfx.serve.images import NotServedByPrompt, error_body, event, parse_images_request
from dcfx.serve.options import ServeOptions
from dcfx.serve.request import EngineStopped, QueueFull
from dcfx.serve.wire import parse_request

logger = logging.getLogger(__name__)

# A replica that has not reported for this long is listed as silent in /health and /stats.
SILENT_AFTER_S = 5.0
# A retry after a replica died that finds every queue full waits this long, doubling up to the max.
RETRY_BUSY_FIRST_S = 0.25
RETRY_BUSY_MAX_S = 2.0
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)


class Gateway:
    """The HTTP ingress: routes, retries on replica death, and maps errors to status codes."""

    def __init__(self, generator: Any, board: Any, options: ServeOptions) -> None:
        self.generator = generator
        self.board = board
        self.options = options
        self.ongoing = 0
        self.draining = False
        self.counts = {"requests": 0, "ok": 0, "bad_request": 0, "queue_full": 0, "retried": 0, "failed": 0}

    async def __call__(self, request: Request) -> Response:
        """Answers one HTTP request."""
        path = request.url.path.rstrip("/") or "/"
        route = (request.method, path)
        if route == ("POST", "/generate"):
            return await self._generate(request)
        if route == ("POST", IMAGES_ROUTE):
            return await self._images(request)
        if route == ("GET", "/health"):
            return await self._health()
        if route == ("GET", "/stats"):
            return JSONResponse(await self._stats())
        return _error(
            404,
            f"no route {request.method} {path}; routes: POST /generate, POST {IMAGES_ROUTE}, GET /health, GET /stats",
        )

    async def _generate(self, request: Request) -> Response:
        payload = await self._accept(request, parse_request, _error)
        if isinstance(payload, Response):
            return payload
        self.ongoing += 1
        try:
            return await self._forward(lambda: self.generator.generate.remote(payload), _generated, _error)
        finally:
            self.ongoing -= 1

    async def _images(self, request: Request) -> Response:
        """``POST /v1/images/generations``: the images API (``dcfx.serve.images``), errors in its shape."""
        payload = await self._accept(request, parse_images_request, _images_error)
        if isinstance(payload, Response):
            return payload
        self.ongoing += 1
        try:
            if payload.get("stream"):
                return await self._stream(payload)
            return await self._forward(lambda: self.generator.images.remote(payload), _images_answer, _images_error)
        finally:
            self.ongoing -= 1

    async def _accept(
        self, request: Request, parse: Callable[[Any], Any], error: Callable[[int, str], Response]
    ) -> dict[str, Any] | Response:
        """Returns the request's JSON body, or the answer when draining or the body is bad (no replica asked)."""
        if self.draining:
            return error(503, "the server is shutting down and takes no new requests")
        self.counts["requests"] += 1
        try:
            payload = json.loads(await request.body())
            parse(payload)
        except (ValueError, TypeError) as e:
            self.counts["bad_request"] += 1
            return error(400, f"bad request: {e}")
        return payload

    async def _stream(self, payload: dict[str, Any]) -> Response:
        """Answers server-sent events; errors before the first event get a status code, later ones an event."""
        stream = self.generator.options(stream=True).images_stream.remote(payload)
        try:
            first = await asyncio.wait_for(stream.__anext__(), timeout=self.options.request_timeout_s)
        except Exception as e:
            status, message = _status_of(e, self.options.request_timeout_s)
            self.counts["bad_request" if status == 400 else "failed"] += 1
            return _images_error(status, message)
        self.counts["ok"] += 1

        async def events() -> AsyncIterator[bytes]:
            self.ongoing += 1  # until the last event is sent
            try:
                yield first
                async for chunk in stream:
                    yield chunk
            except Exception as e:
                logger.exception("dcfx.serve: a stream failed")
                yield event({"type": "error", "error": {"message": f"{type(e).__name__}: {_cause(e)}", "code": 500}})
            finally:
                self.ongoing -= 1

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def _forward(
        self,
        call: Callable[[], Any],
        answer: Callable[[dict[str, Any]], Response],
        error: Callable[[int, str], Response],
    ) -> Response:
        died: list[str] = []
        deadline = time.monotonic() + self.options.request_timeout_s
        backoff = RETRY_BUSY_FIRST_S
        attempt = -1
        while len(died) <= self.options.retries:
            attempt += 1
            try:
                reply = await asyncio.wait_for(call(), timeout=max(deadline - time.monotonic(), 0.001))
            except _REPLICA_GONE as e:
                died.append(_cause(e).splitlines()[0][:200])
                self.counts["retried"] += 1
                logger.warning("dcfx.serve: a replica died during a request (try %d): %s", attempt + 1, died[-1])
                continue
            except EngineStopped as e:  # that replica is shutting down: another one may take it
                died.append(_cause(e))
                self.counts["retried"] += 1
                continue
            except (QueueFull, BackPressureError) as e:
                if died and time.monotonic() + backoff < deadline:
                    # A retry meets the queues the dead replica's requests just filled: it waits
                    # for room (the client has waited already) instead of being refused.
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, RETRY_BUSY_MAX_S)
                    continue
                self.counts["queue_full"] += 1
                return error(*_status_of(e, self.options.request_timeout_s))
            except (ValueError, TypeError, NotServedByPrompt, asyncio.TimeoutError) as e:
                status, message = _status_of(e, self.options.request_timeout_s)
                self.counts["bad_request" if status in (400, 404) else "failed"] += 1
                return error(status, message)
            except Exception as e:  # the generation itself failed (a graph raised, out of memory)
                self.counts["failed"] += 1
                logger.exception("dcfx.serve: a generation failed")
                return error(*_status_of(e, self.options.request_timeout_s))
            self.counts["ok"] += 1
            return answer({**reply, "attempts": attempt + 1})
        self.counts["failed"] += 1
        return error(
            503,
            f"the request failed on {len(died)} replica(s) that died or stopped while serving it "
            f"({self.options.retries} retries): {'; '.join(died)}",
        )

    async def _health(self) -> Response:
        replicas = await self.board.snapshot.remote()
        live = sorted(r for r, s in replicas.items() if s["age_s"] < SILENT_AFTER_S)
        body = {"status": "ok" if live and not self.draining else "unavailable", "replicas": live}
        if self.draining:
            body["draining"] = True
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def _stats(self) -> dict[str, Any]:
        replicas = await self.board.snapshot.remote()
        live = {r: s for r, s in replicas.items() if s["age_s"] < SILENT_AFTER_S}
        total: dict[str, Any] = {}
        for stats in live.values():
            for key, value in stats.items():
                if key in ("age_s", "pid"):
                    continue
                if isinstance(value, dict):
                    bucket = total.setdefault(key, {})
                    for size, count in value.items():
                        bucket[size] = bucket.get(size, 0) + count
                elif isinstance(value, (int, float)):
                    total[key] = total.get(key, 0) + value
        return {"total": total, "replicas": replicas, "gateway": {**self.counts, "ongoing": self.ongoing}}

    async def drain(self, timeout_s: float) -> int:
        """Refuses new requests and waits for those in flight; returns how many were still unfinished."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.ongoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.ongoing


def _cause(error: BaseException) -> str:
    """Returns the message of the exception a replica raised (Ray wraps it with a traceback)."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, BaseException) else error)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _images_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def _status_of(error: BaseException, timeout_s: float) -> tuple[int, str]:
    """Returns the status code and message of a request's failure (Ray wraps a replica's errors)."""
    if isinstance(error, (QueueFull, BackPressureError)):
        if isinstance(error, QueueFull):
            return 503, f"busy: {_cause(error)}"
        return 503, f"busy: every replica's queue is full ({_cause(error).splitlines()[0][:200]})"
    if isinstance(error, (EngineStopped, *_REPLICA_GONE)):
        return 503, f"the replica stopped or died while serving the request: {_cause(error).splitlines()[0][:200]}"
    if isinstance(error, NotServedByPrompt):
        return 404, _cause(error)
    if isinstance(error, (ValueError, TypeError)):
        return 400, f"bad request: {_cause(error)}"
    if isinstance(error, asyncio.TimeoutError):
        return 504, f"the request took longer than request_timeout_s={timeout_s}"
    cause = getattr(error, "cause", None) or error
    return 500, f"the generation failed: {type(cause).__name__}: {cause}"


def _images_answer(reply: dict[str, Any]) -> Response:
    body = {k: v for k, v in reply.items() if k != "attempts"}
    return JSONResponse({**body, "dcfx": {**body["dcfx"], "attempts": reply["attempts"]}})


def _generated(reply: dict[str, Any]) -> Response:
    """Answers ``POST /generate``: PNG bytes, or the latents as JSON, with how it ran in headers."""
    headers = {
        "x-dcfx-replica": reply["replica"],
        "x-dcfx-attempts": str(reply["attempts"]),
        "x-dcfx-full-steps": str(reply["full_steps"]),
        "x-dcfx-shallow-steps": str(reply["shallow_steps"]),
        "x-dcfx-latency-s": f"{reply['latency_s']:.4f}",
    }
    if "png" in reply:
        return Response(reply["png"], media_type="image/png", headers=headers)
    body = {k: v for k, v in reply.items() if k != "latents"}
    return JSONResponse({**body, "latents": reply["latents"]}, headers=headers)
