"""``dcfx serve --model PIPELINE_FOLDER`` as a user runs it: a prompt in over the images API, a PNG out.

A tiny SD pipeline saved with ``save_pretrained`` (tokenizer and text encoder built here), the
command started on loopback with two intervals and two forecasts, then requests as a client
sends them: plain, streamed, with a per-request setting, and bad ones; Ctrl-C stops it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve", reason="the serve extra: pip install 'dcfx[serve]'")

import dcfx
from tests.serve.client import free_port, get, post
from tests.serve.pipelines import save_tiny_sd_pipeline
from tests.serve.test_pipeline_serving import offline as offline_threads


def offline(*args, **call) -> list[bytes]:
    """The offline pipeline at the server's one torch thread (kernels round by thread count too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return offline_threads(*args, **call)
    finally:
        torch.set_num_threads(threads)


pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def stream(url: str, body: dict) -> list:
    """POSTs ``body`` and reads the server-sent events: each ``data:`` line's JSON (or the bare string)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    events = []
    with urllib.request.urlopen(request, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_serve_a_pipeline_folder_by_prompt(tmp_path):
    folder = save_tiny_sd_pipeline(tmp_path / "tiny-sd")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "dcfx.cli", "serve", "--model", str(folder), "--port", str(port)]
    command += ["--max-batch", "4", "--batch-sizes", "2,4", "--interval", "3,5", "--forecast", "none,linear"]
    command += ["--threads", "1", "--drain-timeout", "60"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    route = url + "/v1/images/generations"
    try:
        ready = proc.stdout.readline()
        assert f"ready at {url}" in ready, "".join(errors)[-3000:]

        # What the README shows: a prompt, one PNG back as base64, equal to the offline pipeline's.
        body = {"prompt": "a red fox", "size": "32x32", "seed": 3, "steps": 10, "response_format": "b64_json"}
        status, _, content = post(route, body)
        assert status == 200, content
        answer = json.loads(content)
        assert set(answer) == {"created", "data", "dcfx"} and len(answer["data"]) == 1
        png = base64.b64decode(answer["data"][0]["b64_json"])
        assert png == offline(folder, prompt="a red fox", seed=3, num_inference_steps=10)[0]
        assert (answer["dcfx"]["interval"], answer["dcfx"]["forecast"]) == (3, "none")  # the first of each
        assert answer["dcfx"]["full_steps"] == 4 and answer["dcfx"]["shallow_steps"] == 6

        # The same request streamed: a progress event per step, then the same image.
        events = stream(route, {**body, "stream": True})
        assert events[0] == {"type": "started", "seed": 3} and events[-1] == "[DONE]"
        progress = [e for e in events if isinstance(e, dict) and e["type"] == "progress"]
        assert [e["step"] for e in progress] == list(range(1, 11))
        assert [e["kind"] for e in progress] == ["full", "shallow", "shallow"] * 3 + ["full"]
        (completed,) = [e for e in events if isinstance(e, dict) and e["type"] == "image_generation.completed"]
        assert base64.b64decode(completed["b64_json"]) == png

        # A per-request setting among those the server was started with: the offline run of that config.
        status, _, content = post(route, {**body, "interval": 5, "forecast": "linear"})
        assert status == 200, content
        chosen = base64.b64decode(json.loads(content)["data"][0]["b64_json"])
        config = dcfx.DeepCacheConfig(branch=0, interval=5, forecast="linear")
        assert chosen == offline(folder, config, prompt="a red fox", seed=3, num_inference_steps=10)[0]
        assert chosen != png

        # Bad requests: clear 400s in the images API's error shape; an unknown route 404.
        for bad, words in [
            ({**body, "size": "30x32"}, "multiples of 8"),
            ({**body, "interval": 4}, "does not offer interval 4"),
            ({"size": "32x32"}, "prompt is required"),
            ({**body, "response_format": "url"}, "b64_json"),
        ]:
            status, _, content = post(route, bad)
            error = json.loads(content)["error"]
            assert status == 400 and words in error["message"] and error["code"] == 400, content
        status, _, content = post(url + "/v1/images/edits", body)
        assert status == 404 and b"/v1/images/generations" in content
        stats = get(url + "/stats")[1]["total"]
        assert stats["text_encoder_items"] >= 3 and stats["vae_decoder_items"] >= 3

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        assert "stopped (0 requests unfinished)" in "".join(errors)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
