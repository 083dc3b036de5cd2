"""Serving: a step-batching engine that keeps DeepCache's phases aligned, and its Ray Serve app.

``Engine`` batches the denoising steps of many generations on one dcfx runtime (no Ray
needed); ``dcfx.serve.app`` deploys it on Ray Serve (``pip install 'dcfx[serve]'``), which
``dcfx serve`` starts.
"""

from dcfx.serve.engine import Engine, EngineConfig
from dcfx.serve.models import (
    DigitsServeModel,
    PreparedRequest,
    ServeModel,
    TransformerServeModel,
    UNetServeModel,
    load_serve_model,
)
from dcfx.serve.request import EngineStopped, GenerationRequest, GenerationResult, QueueFull
from dcfx.serve.schedulers import available_schedulers, make_scheduler, register_scheduler

__all__ = [
    "DigitsServeModel",
    "Engine",
    "EngineConfig",
    "EngineStopped",
    "GenerationRequest",
    "GenerationResult",
    "PreparedRequest",
    "QueueFull",
    "ServeModel",
    "TransformerServeModel",
    "UNetServeModel",
    "available_schedulers",
    "load_serve_model",
    "make_scheduler",
    "register_scheduler",
]
