"""The Ray Serve application that ``dcfx serve`` starts (``pip install 'dcfx[serve]'``).

Three deployments:

- ``Generator`` (``replicas`` of them): loads the model, compiles it with dcfx and runs a
  step-batching ``Engine`` in a thread; ``generate`` submits one request to it.
- ``Gateway`` (the HTTP ingress): ``POST /generate`` (the body of ``dcfx.serve.wire``; the
  answer is PNG bytes or latents as JSON), ``GET /health``, ``GET /stats``. A request whose
  replica dies is sent again to another replica (generation is deterministic, so a retry
  gives the same image), ``retries`` times at most, then it fails with a 503 saying so; a
  retry that finds the queues full waits for room. A new request meeting a full queue is
  answered 503 at once; a bad request 400; a request that takes longer than
  ``request_timeout_s`` 504. Every request gets an answer.
- ``StatsBoard``: each replica reports its engine's counters twice a second; ``/stats`` sums
  them and lists each replica's.

This is the only dcfx module that imports Ray.

Example:
    >>> app = ServeApp(ServeOptions(model="digits", replicas=2), port=8000)
    >>> url = app.start()  # a local Ray instance, or address= to join a cluster
    >>> app.stop()  # drain: in-flight requests finish, new ones get 503; then shut down
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import dcfx
from dcfx.config import DeepCacheConfig
from dcfx.serve.engine import Engine, EngineConfig
from dcfx.serve.models import DigitsServeModel, load_serve_model
from dcfx.serve.request import EngineStopped, GenerationRequest, QueueFull
from dcfx.serve.wire import encode_latents, parse_request

logger = logging.getLogger(__name__)

APP_NAME = "dcfx"
REPORT_PERIOD_S = 0.5
# A replica that has not reported for this long is listed as silent in /health and /stats.
SILENT_AFTER_S = 5.0
# A retry after a replica died that finds every queue full waits this long, doubling up to the max.
RETRY_BUSY_FIRST_S = 0.25
RETRY_BUSY_MAX_S = 2.0
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What ``dcfx serve`` deploys.

    Attributes:
        model: "digits" (bundled) or a model folder (``dcfx.serve.load_serve_model``).
        replicas: Generator replicas.
        max_batch: U-Net rows per cohort at most (``EngineConfig.max_batch``).
        batch_sizes: Batch sizes calls are padded to (default: powers of two up to max_batch).
        max_wait: Ticks a request may wait for its cohort's next full step (None: always).
        max_queue: Requests waiting per replica at most; more are refused with a 503.
        branch: DeepCache branch of a U-Net (default 0).
        first: A diffusion transformer's blocks run first on every step (default 1).
        last: A diffusion transformer's blocks run last on every step (default 0); a mix with
            ``branch`` is refused.
        interval: N of the uniform 1:N schedule.
        forecast: What shallow steps read (``dcfx.available_forecasts()``): "none" (the paper's
            reuse) or "linear" (a forecast from the last two full steps).
        backend: dcfx backend ("eager" or "inductor").
        threads: torch threads per replica (default: the machine's cores / replicas).
        retries: Times a request is sent again when its replica died.
        request_timeout_s: Seconds a request may take before it is answered with a 504.
        warmup: Build the graphs of every batch size before a replica takes requests (digits
            models; other models build them on first use).
    """

    model: str = "digits"
    replicas: int = 1
    max_batch: int = 16
    batch_sizes: tuple[int, ...] | None = None
    max_wait: int | None = None
    max_queue: int = 64
    branch: int | None = None
    first: int | None = None
    last: int | None = None
    interval: int = 5
    forecast: str = "none"
    backend: str = "eager"
    threads: int | None = None
    retries: int = 2
    request_timeout_s: float = 300.0
    warmup: bool = True

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch", "interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.retries < 0 or self.request_timeout_s <= 0:
            raise ValueError(
                f"retries must be >= 0 and request_timeout_s > 0, got {self.retries}, {self.request_timeout_s}"
            )
        self.engine_config()  # fails here, in the caller, for bad batching settings
        self.deepcache_config()  # and for a bad DeepCache setting

    def deepcache_config(self) -> DeepCacheConfig:
        """Returns the DeepCache settings of each replica's runtime."""
        return DeepCacheConfig(
            branch=self.branch, first=self.first, last=self.last, interval=self.interval, forecast=self.forecast
        )

    def engine_config(self) -> EngineConfig:
        """Returns the engine settings of each replica."""
        return EngineConfig(
            max_batch=self.max_batch, batch_sizes=self.batch_sizes, max_wait=self.max_wait, max_queue=self.max_queue
        )


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
        model = load_serve_model(options.model)
        runtime = dcfx.compile(model.unet, options.deepcache_config(), backend=options.backend)
        self.engine = Engine(runtime, model, options.engine_config())
        if options.warmup and isinstance(model, DigitsServeModel):
            self.engine.warmup(GenerationRequest(labels=(0,), steps=1))
        self.engine.start()
        self.model = model
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        self.board = board
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="dcfx-serve-report", daemon=True).start()

    def _report(self) -> None:
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                self.board.report.remote(self.replica, {"pid": self.pid, **self.engine.stats()})
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
        """Returns this replica's engine counters."""
        return {"replica": self.replica, "pid": self.pid, **self.engine.stats()}

    def check_health(self) -> None:
        """Raises when the engine's thread is gone (Serve then replaces the replica)."""
        if not self.engine.alive:
            raise RuntimeError("the dcfx engine thread of this replica stopped")

    def __del__(self) -> None:
        stop = self.__dict__.get("_stop")
        if stop is not None:
            stop.set()
            self.engine.close(drain=True, timeout=10.0)


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
        if route == ("GET", "/health"):
            return await self._health()
        if route == ("GET", "/stats"):
            return JSONResponse(await self._stats())
        return _error(404, f"no route {request.method} {path}; routes: POST /generate, GET /health, GET /stats")

    async def _generate(self, request: Request) -> Response:
        if self.draining:
            return _error(503, "the server is shutting down and takes no new requests")
        self.counts["requests"] += 1
        try:
            payload = json.loads(await request.body())
            parse_request(payload)  # a bad body is answered here, without a replica
        except (ValueError, TypeError) as e:
            self.counts["bad_request"] += 1
            return _error(400, f"bad request: {e}")
        self.ongoing += 1
        try:
            return await self._forward(payload)
        finally:
            self.ongoing -= 1

    async def _forward(self, payload: dict[str, Any]) -> Response:
        died: list[str] = []
        deadline = time.monotonic() + self.options.request_timeout_s
        backoff = RETRY_BUSY_FIRST_S
        attempt = -1
        while len(died) <= self.options.retries:
            attempt += 1
            try:
                reply = await asyncio.wait_for(
                    self.generator.generate.remote(payload), timeout=max(deadline - time.monotonic(), 0.001)
                )
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
                if isinstance(e, QueueFull):
                    return _error(503, f"busy: {_cause(e)}")
                return _error(503, f"busy: every replica's queue is full ({_cause(e).splitlines()[0][:200]})")
            except (ValueError, TypeError) as e:
                self.counts["bad_request"] += 1
                return _error(400, f"bad request: {_cause(e)}")
            except asyncio.TimeoutError:
                self.counts["failed"] += 1
                return _error(504, f"the request took longer than request_timeout_s={self.options.request_timeout_s}")
            except Exception as e:  # the generation itself failed (a graph raised, out of memory)
                self.counts["failed"] += 1
                logger.exception("dcfx.serve: a generation failed")
                cause = getattr(e, "cause", None) or e
                return _error(500, f"the generation failed: {type(cause).__name__}: {cause}")
            self.counts["ok"] += 1
            headers = {
                "x-dcfx-replica": reply["replica"],
                "x-dcfx-attempts": str(attempt + 1),
                "x-dcfx-full-steps": str(reply["full_steps"]),
                "x-dcfx-shallow-steps": str(reply["shallow_steps"]),
                "x-dcfx-latency-s": f"{reply['latency_s']:.4f}",
            }
            if "png" in reply:
                return Response(reply["png"], media_type="image/png", headers=headers)
            body = {k: v for k, v in reply.items() if k != "latents"}
            return JSONResponse({**body, "attempts": attempt + 1, "latents": reply["latents"]}, headers=headers)
        self.counts["failed"] += 1
        return _error(
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


def build_app(options: ServeOptions) -> Any:
    """Returns the Serve application (Gateway over Generator replicas and the StatsBoard)."""
    # Replicas import the dcfx this process imported (a source checkout, or an installed one).
    source = str(Path(dcfx.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    actor = {"num_cpus": 0, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    board = serve.deployment(StatsBoard).options(ray_actor_options=actor).bind()
    per_replica = options.max_batch + options.max_queue + 1  # one more than the engine holds: it answers QueueFull
    generator = (
        serve.deployment(Generator)
        .options(
            num_replicas=options.replicas,
            ray_actor_options=actor,
            max_ongoing_requests=per_replica,
            # Ray counts a request as queued until a replica is picked, a burst included: the
            # engines' queues are the real bound; this one only caps requests between them.
            max_queued_requests=max(100, 2 * options.replicas * per_replica),
            health_check_period_s=2.0,
            health_check_timeout_s=30.0,
            graceful_shutdown_timeout_s=10.0,
        )
        .bind(options, board)
    )
    gateway = serve.deployment(Gateway).options(
        ray_actor_options=actor,
        max_ongoing_requests=max(1000, 2 * options.replicas * per_replica),
        max_queued_requests=-1,
    )
    return gateway.bind(generator, board, options)


class ServeApp:
    """Starts the application on a local Ray instance or a cluster, and stops it gracefully.

    Args:
        options: What to deploy.
        host: HTTP host of Serve's proxy (127.0.0.1: loopback only).
        port: HTTP port.
        address: A Ray cluster to join (``ray://...`` or ``host:port``); None starts a local
            Ray instance, which ``stop`` shuts down.
    """

    def __init__(self, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None):
        self.options = options
        self.host = host
        self.port = port
        self.address = address
        self._own_ray = False
        self._handle: Any = None

    @property
    def url(self) -> str:
        """The application's base URL."""
        return f"http://{self.host}:{self.port}"

    def start(self, ray_init: dict[str, Any] | None = None) -> str:
        """Starts Ray (or joins it), Serve and the application; returns the base URL when it is ready."""
        if not ray.is_initialized():
            self._own_ray = self.address is None
            init = {"address": self.address or "local", "include_dashboard": False, **(ray_init or {})}
            ray.init(**init)
        serve.start(http_options={"host": self.host, "port": self.port})
        self._handle = serve.run(build_app(self.options), name=APP_NAME, route_prefix="/")
        return self.url

    def stop(self, drain_timeout_s: float = 60.0) -> int:
        """Drains (new requests get 503, in-flight ones finish), removes the app, shuts down what it started.

        Returns how many requests were still unfinished when the drain timed out.
        """
        unfinished = 0
        if self._handle is not None:
            try:
                unfinished = self._handle.drain.remote(drain_timeout_s).result(timeout_s=drain_timeout_s + 30)
            except Exception:
                logger.exception("dcfx.serve: draining the gateway failed; shutting down anyway")
            self._handle = None
        if self._own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)  # a joined cluster keeps Serve and its other applications
        return unfinished
