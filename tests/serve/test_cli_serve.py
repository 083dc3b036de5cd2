"""``dcfx serve`` as a user runs it: a local Ray instance, requests, then Ctrl-C drains and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the serve extra: pip install 'dcfx[serve]'")

from dcfx.serve import EngineConfig
from tests.serve.client import Offline, free_port, get, post

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_serve_command_answers_then_drains_on_ctrl_c():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "dcfx.cli", "serve", "--port", str(port), "--max-batch", "2"]
    command += ["--batch-sizes", "2", "--interval", "3", "--forecast", "linear", "--threads", "1"]
    command += ["--drain-timeout", "120"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    try:
        ready = proc.stdout.readline()  # blocks until the app is up (or the command died)
        assert f"ready at {url}" in ready, "".join(errors)[-3000:]
        body = {"label": 7, "seed": 3, "steps": 8}
        status, _, png = post(url + "/generate", body)
        assert status == 200
        # Served with the forecast it was started with: the offline forecast generation, not plain reuse.
        config = EngineConfig(max_batch=2, batch_sizes=(2,))
        assert png == Offline(3, config, forecast="linear").png(body)
        assert png != Offline(3, config).png(body)
        deadline = time.monotonic() + 30  # replicas report their counters every so often
        while get(url + "/stats")[1]["total"].get("completed", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get(url + "/stats")[1]["total"]["forecast_calls"] == 3  # steps 4, 5 and 7 of 8 (full: 0, 3, 6)
        with ThreadPoolExecutor(2) as pool:
            # Two long generations in flight when Ctrl-C comes: they finish; a new request is refused.
            slow = [pool.submit(post, url + "/generate", {"label": d, "steps": 300}) for d in (1, 2)]
            deadline = time.monotonic() + 60
            while get(url + "/stats")[1]["total"].get("running", 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            status, _, content = post(url + "/generate", body)
            assert status == 503 and b"shutting down" in content
            assert [f.result()[0] for f in slow] == [200, 200]
        assert proc.wait(timeout=120) == 0
        assert "stopped (0 requests unfinished)" in "".join(errors)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        get(url + "/health", timeout=5)  # nothing listens any more
