"""The dcfx version (recorded in manifests and cache keys; ``dcfx.__version__``)."""

__version__ = "0.1.0"
