"""The HTTP API's bodies: requests from JSON, latents and PNG images back."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from dcfx.serve.models import images_png
from dcfx.serve.wire import decode_latents, encode_latents, parse_request


def test_a_digits_body_becomes_a_request():
    request, output = parse_request({"label": 4, "seed": 3, "steps": 20, "size": [16, 24], "scheduler": "dpm"})
    fields = (request.labels, request.seed, request.steps, request.size, request.scheduler)
    assert fields == ((4,), 3, 20, (16, 24), "dpm")
    assert output == "png" and request.guidance == 1.0
    request, output = parse_request({"labels": [1, 2], "guidance": 2, "output": "latents"})
    assert request.labels == (1, 2) and request.guided and output == "latents"


def test_conditioning_lists_become_tensors():
    rows = [[[0.5, -1.0], [2.0, 0.0]]]
    request, _ = parse_request({"conditioning": {"encoder_hidden_states": rows}, "output": "latents"})
    states = request.conditioning["encoder_hidden_states"]
    assert states.dtype == torch.float32 and states.shape == (1, 2, 2)
    request, _ = parse_request({"conditioning": {"class_labels": [3]}})
    assert request.conditioning["class_labels"].dtype == torch.int64


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ([1, 2], TypeError, "must be a JSON object, got list"),
        ({"lable": 1}, ValueError, r"unknown request key\(s\) \['lable'\]; valid: label, labels"),
        ({"label": 1, "labels": [1]}, ValueError, "either label or labels"),
        ({"label": 1, "output": "jpeg"}, ValueError, "output must be one of png, latents, got 'jpeg'"),
        ({"labels": 3}, TypeError, "labels must be a list of ints"),
        ({"label": 1, "steps": "many"}, TypeError, "steps must be an int >= 1, got 'many'"),
        ({"conditioning": {"encoder_hidden_states": [[1.0], [2.0, 3.0]]}}, ValueError, "rectangular nested list"),
        ({"conditioning": [1.0]}, TypeError, "conditioning must be a JSON object"),
    ],
)
def test_bad_bodies_name_what_is_wrong(body, error, match):
    with pytest.raises(error, match=match):
        parse_request(body)


def test_latents_round_trip_exactly():
    latents = torch.randn(2, 4, 3, 5)
    body = encode_latents(latents)
    assert body["shape"] == [2, 4, 3, 5] and body["dtype"] == "float32"
    torch.testing.assert_close(decode_latents(body), latents, atol=0, rtol=0)


def test_images_become_one_png_side_by_side():
    images = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    with Image.open(io.BytesIO(images_png(images))) as png:
        assert png.size == (32, 16) and png.mode == "L"
        pixels = torch.tensor(list(png.getdata()), dtype=torch.float32).reshape(16, 32)
    want = torch.cat(list(((images[:, 0] + 1) * 127.5).round()), dim=1)
    torch.testing.assert_close(pixels, want, atol=0, rtol=0)
