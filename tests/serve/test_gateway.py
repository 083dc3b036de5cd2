"""The gateway's retry rules, on a scripted Generator handle (no Ray instance).

A replica killed under load fails its requests on the other replica, whose queue the first
requests may have filled: the retry must wait for room, not be answered "busy"; a new request
meeting a full queue is refused at once; deaths beyond ``retries`` are reported as deaths.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("ray.serve", reason="the serve extra: pip install 'dcfx[serve]'")

from ray.exceptions import ActorDiedError

from dcfx.serve import gateway as gateway_module
from dcfx.serve.gateway import Gateway, _error, _generated
from dcfx.serve.options import ServeOptions
from dcfx.serve.request import QueueFull

REPLY = {"replica": "r1", "full_steps": 2, "shallow_steps": 4, "latency_s": 0.1, "latents": "x"}


class ScriptedGenerator:
    """``generate.remote`` answers from a script: an exception to raise or a reply to return."""

    def __init__(self, script):
        self.script = list(script)
        self.calls: list[float] = []
        self.generate = self

    def remote(self, payload):
        self.calls.append(time.monotonic())
        outcome = self.script.pop(0)

        async def answer():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return answer()


def forward(script, **options):
    generator = ScriptedGenerator(script)
    gateway = Gateway(generator, board=None, options=ServeOptions(**{"request_timeout_s": 30, **options}))
    response = asyncio.run(gateway._forward(lambda: generator.generate.remote({"label": 1}), _generated, _error))
    return response, generator, gateway


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(gateway_module, "RETRY_BUSY_FIRST_S", 0.01)
    monkeypatch.setattr(gateway_module, "RETRY_BUSY_MAX_S", 0.02)


def test_a_retry_after_a_death_waits_for_room_in_a_full_queue():
    full = QueueFull("the queue is full (4 requests waiting, max_queue=4); retry later")
    response, generator, gateway = forward([ActorDiedError(), full, full, full, REPLY])
    assert response.status_code == 200, response.body
    assert response.headers["x-dcfx-attempts"] == "5"
    assert len(generator.calls) == 5 and gateway.counts["queue_full"] == 0
    assert gateway.counts["retried"] == 1 and gateway.counts["ok"] == 1
    waits = [b - a for a, b in zip(generator.calls[1:], generator.calls[2:], strict=False)]
    assert all(w >= 0.01 for w in waits)  # it backed off between the busy answers


def test_a_new_request_meeting_a_full_queue_is_refused_at_once():
    response, generator, gateway = forward([QueueFull("the queue is full"), REPLY])
    assert response.status_code == 503 and b"busy: the queue is full" in response.body
    assert len(generator.calls) == 1 and gateway.counts["queue_full"] == 1


def test_a_retry_still_busy_at_its_deadline_is_answered_busy():
    full = QueueFull("the queue is full")
    response, generator, _ = forward([ActorDiedError()] + [full] * 1000, request_timeout_s=0.2)
    assert response.status_code == 503 and b"busy:" in response.body
    assert 3 <= len(generator.calls) < 1000


def test_deaths_beyond_the_retries_are_answered_as_deaths():
    response, generator, gateway = forward([ActorDiedError()] * 3 + [REPLY], retries=2)
    assert response.status_code == 503
    error = json.loads(response.body)["error"]
    assert "failed on 3 replica(s) that died" in error and "(2 retries)" in error
    assert len(generator.calls) == 3 and gateway.counts["failed"] == 1
