"""``dcfx serve --model FOLDER --first F --last B`` on a saved diffusion transformer, over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve", reason="the serve extra: pip install 'dcfx[serve]'")

import dcfx
from dcfx.serve import Engine, EngineConfig, GenerationRequest, load_serve_model
from dcfx.serve.wire import decode_latents
from tests.serve.client import free_port, post
from tests.transformers.tiny import BUILDERS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_serve_command_on_a_transformer_folder_equals_the_offline_engine(tmp_path):
    tiny = BUILDERS["sd3"]()
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    tiny.pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "dcfx.cli", "serve", "--model", str(tmp_path), "--port", str(port)]
    command += ["--first", "1", "--last", "1", "--interval", "3", "--max-batch", "2", "--batch-sizes", "2"]
    command += ["--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    cond = {
        "encoder_hidden_states": tiny.call["prompt_embeds"],
        "pooled_projections": tiny.call["pooled_prompt_embeds"],
    }
    body = {
        "conditioning": {k: v.tolist() for k, v in cond.items()},
        **{"seed": 4, "steps": 6, "size": 8, "scheduler": "flow", "output": "latents"},
    }
    try:
        ready = proc.stdout.readline()  # blocks until the app is up (or the command died)
        assert f"ready at {url}" in ready, "".join(errors)[-3000:]
        status, _, content = post(url + "/generate", body)
        assert status == 200, content[-2000:]
        reply = json.loads(content)
        assert (reply["full_steps"], reply["shallow_steps"]) == (2, 4)
        served = decode_latents(reply["latents"])
        status, _, content = post(url + "/generate", {**body, "output": "png"})
        assert status == 400 and b"gives latents only" in content
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    model = load_serve_model(str(tmp_path))
    runtime = dcfx.compile(model.unet, first=1, last=1, interval=3)
    request = GenerationRequest(conditioning=cond, seed=4, steps=6, size=(8, 8), scheduler="flow")
    offline = Engine(runtime, model, EngineConfig(max_batch=2, batch_sizes=(2,))).run([request])[0]
    torch.testing.assert_close(served, offline.latents, atol=0, rtol=0)
