"""The Ray Serve application on loopback: concurrent requests, errors, a replica killed under load.

One local Ray instance for the module (two Generator replicas of the digits model, calls
padded to one batch size, so every answer equals the offline run bit for bit).
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve", reason="the serve extra: pip install 'dcfx[serve]'")

from dcfx.serve import EngineConfig
from dcfx.serve.app import ServeApp, ServeOptions
from dcfx.serve.wire import decode_latents
from tests.serve.client import Offline, free_port, get, post, post_until_taken

pytestmark = pytest.mark.slow

OPTIONS = ServeOptions(
    replicas=2, max_batch=4, batch_sizes=(4,), max_queue=4, interval=3, threads=1, request_timeout_s=120
)


@pytest.fixture(scope="module")
def app():
    app = ServeApp(OPTIONS, port=free_port())
    app.start(ray_init={"log_to_driver": False, "num_cpus": 2})
    yield app
    assert app.stop(drain_timeout_s=30) == 0


@pytest.fixture(scope="module")
def offline():
    return Offline(OPTIONS.interval, EngineConfig(max_batch=4, batch_sizes=(4,)))


def test_concurrent_requests_equal_offline_generation(app, offline):
    outputs = ["latents"] * 4 + ["png"] * 4
    bodies = [{"label": d, "seed": d, "steps": 6 + 3 * (d % 2), "output": outputs[d]} for d in range(8)]
    # Ray Serve may route more of them to one replica than its queue holds: those get a 503
    # "busy" at once and the client tries again (the full-queue test covers the 503 itself).
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post_until_taken(app.url + "/generate", b), bodies))
    for body, (status, headers, content) in zip(bodies, answers, strict=True):
        assert status == 200, content
        if body["output"] == "png":
            assert headers["content-type"] == "image/png"
            assert content == offline.png(body)
        else:
            got = decode_latents(json.loads(content)["latents"])
            assert (got == offline.latents(body)).all()
        full, shallow = int(headers["x-dcfx-full-steps"]), int(headers["x-dcfx-shallow-steps"])
        assert (full, full + shallow) == ((body["steps"] + 2) // 3, body["steps"])
    status, health = get(app.url + "/health")
    assert status == 200 and health["status"] == "ok" and len(health["replicas"]) == 2
    time.sleep(1.0)  # a report period or two
    _, stats = get(app.url + "/stats")
    total = stats["total"]
    assert total["completed"] >= 8 and total["full_calls"] > 0 and total["shallow_calls"] > 0
    assert max(int(k) for k in total["full_rows"]) >= 2  # steps of concurrent requests shared calls
    assert stats["gateway"]["ok"] >= 8 and total["queue"] == 0


def test_bad_requests_and_routes_get_clear_errors(app):
    status, _, content = post(app.url + "/generate", {"label": 12, "steps": 2})
    assert status == 400 and b"labels must be digits 0..9, got [12]" in content
    status, _, content = post(app.url + "/generate", {"lable": 1})
    assert status == 400 and b"unknown request key(s) ['lable']" in content
    status, body = get(app.url + "/nowhere")
    routes = "routes: POST /generate, POST /v1/images/generations, GET /health, GET /stats"
    assert status == 404 and routes in body["error"]


def test_a_full_queue_answers_503_at_once(app):
    # Each replica holds 4 running and 4 waiting requests; the rest are refused at once (long
    # generations, so that a refusal is first by far even on a loaded host).
    bodies = [{"label": d % 10, "seed": d, "steps": 200, "output": "latents"} for d in range(30)]

    def timed(body):
        start = time.perf_counter()
        status, _, content = post(app.url + "/generate", body)
        return status, content, time.perf_counter() - start

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(timed, bodies))
    busy = [a for a in answers if a[0] == 503]
    done = [a for a in answers if a[0] == 200]
    assert len(busy) + len(done) == len(bodies)  # every request answered
    assert busy and all(b"busy:" in content for _, content, _ in busy)
    assert max(t for *_, t in busy) < min(t for *_, t in done)  # refused before any generation finished


def test_a_replica_killed_under_load_loses_no_request(app, offline):
    bodies = [{"label": d, "seed": 50 + d, "steps": 45, "output": "latents"} for d in range(6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post, app.url + "/generate", b, 240) for b in bodies]
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            _, stats = get(app.url + "/stats")
            busy = [s for s in stats["replicas"].values() if s["running"] > 0 and s["age_s"] < 2]
            if len(busy) == 2:  # both replicas hold some of the requests
                victim = busy[0]["pid"]
            time.sleep(0.05)
        assert victim is not None, "the load never reached both replicas"
        os.kill(victim, signal.SIGKILL)
        answers = [f.result() for f in futures]  # none hangs: each has a timeout
    retried = 0
    for body, (status, headers, content) in zip(bodies, answers, strict=True):
        if status == 200:
            retried += int(headers["x-dcfx-attempts"]) > 1
            assert (decode_latents(json.loads(content)["latents"]) == offline.latents(body)).all()
        else:  # no replica left to take it: a clear error, not silence
            assert status == 503 and b"died" in content, content
    assert retried >= 1  # the killed replica's requests went to the other one
    status, health = get(app.url + "/health")
    assert status == 200 and health["replicas"]
