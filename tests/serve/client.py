"""A small HTTP client for the serve tests (stdlib only)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import torch

import dcfx
from dcfx.digits import load_model
from dcfx.serve import DigitsServeModel, Engine, EngineConfig, GenerationRequest


def free_port() -> int:
    """Returns a TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict[str, Any], timeout: float = 300.0) -> tuple[int, dict[str, str], bytes]:
    """POSTs ``body`` as JSON; returns the status, the headers and the body (errors included)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def post_until_taken(
    url: str, body: dict[str, Any], attempts: int = 20, wait_s: float = 0.5
) -> tuple[int, dict[str, str], bytes]:
    """POSTs ``body`` as a client should: a 503 "busy" (a replica's queue was full) is tried again
    after a pause, as its message says; any other answer, or the last attempt's, is returned."""
    import time

    for _ in range(attempts - 1):
        status, headers, content = post(url, body)
        if status != 503 or b"busy:" not in content:
            return status, headers, content
        time.sleep(wait_s)
    return post(url, body)


def get(url: str, timeout: float = 60.0) -> tuple[int, Any]:
    """GETs ``url``; returns the status and the JSON body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Offline:
    """The same requests run here, alone, with the server's engine settings: what it must answer."""

    def __init__(self, interval: int, config: EngineConfig, forecast: str = "none") -> None:
        model = load_model()
        self.model = DigitsServeModel(model)
        self.runtime = dcfx.compile(model.unet, branch=0, interval=interval, forecast=forecast)
        self.config = config

    def latents(self, body: dict[str, Any], threads: int = 1) -> torch.Tensor:
        """The request's latents, computed with the replicas' torch thread count (``threads=1`` in
        the tests' apps): a convolution's float sums depend on how the work is split."""
        request = GenerationRequest(labels=(body["label"],), seed=body.get("seed", 0), steps=body.get("steps", 50))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return Engine(self.runtime, self.model, self.config).run([request])[0].latents
        finally:
            torch.set_num_threads(before)

    def png(self, body: dict[str, Any]) -> bytes:
        return self.model.png(self.latents(body))
