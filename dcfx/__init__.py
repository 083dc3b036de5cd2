"""dcfx: DeepCache for diffusion U-Nets as a compiler pass.

pipe.unet = dcfx.compile(pipe.unet, branch=0, interval=5, scheduler=pipe.scheduler)
"""

from dcfx.api import compile, disable, enable  # noqa: A004  (dcfx.compile is the public verb)
from dcfx.backends import available_backends, register_backend
from dcfx.branches import BranchInfo, branches
from dcfx.config import DeepCacheConfig
from dcfx.runtime import DeepCacheUNet

__version__ = "0.1.0"

__all__ = [
    "BranchInfo",
    "DeepCacheConfig",
    "DeepCacheUNet",
    "available_backends",
    "branches",
    "compile",
    "disable",
    "enable",
    "register_backend",
]
