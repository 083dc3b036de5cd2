"""dcfx: DeepCache for diffusion U-Nets as a compiler pass.

pipe.unet = dcfx.compile(pipe.unet, branch=0, interval=5, scheduler=pipe.scheduler)
dcfx.export(pipe.unet, "out/", branch=0, interval=5, format="onnx"); pipe.unet = dcfx.load("out/")
"""

from dcfx.api import compile, disable, enable  # noqa: A004  (dcfx.compile is the public verb)
from dcfx.backends import available_backends, register_backend
from dcfx.branches import BranchInfo, branches
from dcfx.config import DeepCacheConfig
from dcfx.deploy import export, load
from dcfx.export import ArtifactError
from dcfx.runtime import DeepCacheUNet
from dcfx.tune import tune
from dcfx.version import __version__  # noqa: F401  (dcfx.__version__)

__all__ = [
    "ArtifactError",
    "BranchInfo",
    "DeepCacheConfig",
    "DeepCacheUNet",
    "available_backends",
    "branches",
    "compile",
    "disable",
    "enable",
    "export",
    "load",
    "register_backend",
    "tune",
]
