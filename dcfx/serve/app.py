"""The Ray Serve application that ``dcfx serve`` starts (``pip install 'dcfx[serve]'``).

Three deployments:

- ``Generator`` (``replicas`` of them; ``dcfx.serve.replica``): loads the model, compiles it
  with dcfx and runs a step-batching ``Engine`` in a thread (a pipeline served by prompt also
  its text-encoder and VAE stages, ``dcfx.serve.service``).
- ``Gateway`` (the HTTP ingress; ``dcfx.serve.gateway``): ``POST /generate`` (the body of
  ``dcfx.serve.wire``; the answer is PNG bytes or latents as JSON), ``POST
  /v1/images/generations`` (``dcfx.serve.images``: a prompt in, base64 PNGs or server-sent
  events out), ``GET /health``, ``GET /stats``. A request whose replica dies is sent again to
  another replica (generation is deterministic, so a retry gives the same image), ``retries``
  times at most, then it fails with a 503 saying so; a retry that finds the queues full waits
  for room. A new request meeting a full queue is answered 503 at once; a bad request 400; a
  request that takes longer than ``request_timeout_s`` 504. Every request gets an answer.
- ``StatsBoard``: each replica reports its engine's counters twice a second; ``/stats`` sums
  them and lists each replica's.

Only this module, ``dcfx.serve.gateway`` and ``dcfx.serve.replica`` import Ray.

Example:
    >>> app = ServeApp(ServeOptions(model="digits", replicas=2), port=8000)
    >>> url = app.start()  # a local Ray instance, or address= to join a cluster
    >>> app.stop()  # drain: in-flight requests finish, new ones get 503; then shut down
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve

import dcfx
from dcfx.serve.gateway import Gateway
from dcfx.serve.options import ServeOptions
from dcfx.serve.replica import Generator, StatsBoard

__all__ = ["APP_NAME", "ServeApp", "ServeOptions", "build_app"]

logger = logging.getLogger(__name__)

APP_NAME = "dcfx"


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
