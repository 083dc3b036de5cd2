"""Deployment formats: the graph pair written as ONNX, TensorRT engines or AOTInductor packages.

Each format (``onnx``, ``tensorrt``, ``aoti``; a registry, ``register_format``) writes its
files from the lowered pair (``dcfx.export.program``) and loads them back as an
``ExportedPair``; ``dcfx.export.writer`` adds the manifest and the check. The public verbs
``dcfx.export`` and ``dcfx.load`` live in ``dcfx.deploy``.
"""

from __future__ import annotations

from dcfx.export.manifest import ArtifactError
from dcfx.export.registry import available_formats, check_format_options, get_format, register_format

__all__ = ["ArtifactError", "available_formats", "check_format_options", "get_format", "register_format"]

from dcfx.export import aoti, onnx, tensorrt  # noqa: F401  (registration)
