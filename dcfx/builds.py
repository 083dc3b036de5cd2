"""How ``dcfx.compile`` builds the graph pair a runtime asks for, per input signature or per range.

- ``CaptureAndCompile``: one pair per input signature (static shapes): capture, cut, compile.
- ``RangedCapture``: one pair for every call inside named ranges (batch, height, width, prompt
  length), captured once with symbolic sizes; the eager backend runs it at any size.
- ``AheadOfTime``: Inductor ahead of time (AOTInductor): the pair exported over the ranges
  (or the call's own sizes) into ``.pt2`` packages, loaded back, and kept in a cache
  directory keyed by the model's weights, config, branch, sizes and versions, so that a
  second process loads it in seconds instead of compiling for minutes.

Every build follows the ``Build`` protocol: ``bucket(names, tensors)`` says which calls share
a pair (None: one pair per input signature; a build with ranges hands every call of the same
bucket the same pair, and refuses a call outside the ranges by name) and ``build(names,
tensors, forecast)`` makes it. Builds are registered per (backend, shape mode) in
``BUILDS``; ``make_build`` picks one and refuses a backend and shape mode that do not go
together, naming those that do.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcfx.backends import Build, CompiledPair, available_backends, compile_lock, get_backend, warm_up
from dcfx.config import DeepCacheConfig
from dcfx.export.manifest import ArtifactError, read_manifest
from dcfx.export.program import build_ranged_pair, call_sizes, trace_call
from dcfx.export.registry import get_format
from dcfx.export.shapes import DimRange
from dcfx.export.writer import write_export
from dcfx.models import spec_for, unflatten
from dcfx.passes import build_graph_pair
from dcfx.util import jsonable, weights_digest
from dcfx.version import __version__

logger = logging.getLogger(__name__)

# Bump when what a cached package holds or its key changes meaning. 2: the forecast graph's
# package too; 3: one JSON form of the config in keys and manifests.
CACHE_VERSION = 3


@dataclasses.dataclass
class CaptureAndCompile:
    """Builds the graph pair of one input signature: capture, cut at ``branch``, compile.

    A plain object rather than a closure, so that a ``DeepCacheUNet`` pickles (the backend
    is looked up by name when a pair is built).
    """

    unet: nn.Module
    branch: int | tuple[int, int]  # a U-Net's branch or a transformer's (first, last)
    backend: str
    options: dict[str, Any]

    def bucket(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """One pair per input signature: no bucket."""
        return None

    def __call__(
        self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool = False
    ) -> CompiledPair:
        """Returns the compiled pair for inputs named ``names`` like ``tensors``, ready to run.

        With ``forecast``, the pair also has the forecast graph (``dcfx.passes.forecast``).
        """
        with compile_lock:
            graphs = build_graph_pair(self.unet, self.branch, names, tensors, forecast=forecast)
            extra = {"forecast": graphs.forecast} if forecast else {}
            return get_backend(self.backend)(graphs.full, graphs.shallow, tensors, **extra, **self.options)


def check_sizes(
    model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dims: Mapping[str, DimRange]
) -> None:
    """Raises ValueError for a call whose batch, height, width or prompt length is outside ``dims``."""
    sizes = call_sizes(model, names, tensors)
    for name, dim in dims.items():
        value = sizes.get(name)
        if value is not None and not dim.contains(value):
            raise ValueError(
                f"the call's {name} is {value}, outside this runtime's range {dim.describe()}: compile with "
                f"dynamic={{{name!r}: (min, max)}} covering it"
            )


def settle_dims(
    builder: RangedCapture | AheadOfTime, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]
) -> None:
    """Fixes the builder's dimensions taken from the first call (``from_first_call``) at its sizes."""
    if not builder.from_first_call or builder.dims is None:
        return
    sizes = call_sizes(builder.unet, names, tensors)
    for name in builder.from_first_call:
        if name in sizes:
            builder.dims[name] = DimRange(name, sizes[name], sizes[name], sizes[name])
    builder.from_first_call = ()


def _trace_tensors(
    model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dims: Mapping[str, DimRange]
) -> tuple[torch.Tensor, ...]:
    return trace_call(model, names, tensors, dims)


@dataclasses.dataclass
class RangedCapture:
    """Builds one graph pair for every call inside ``dims``: a capture with symbolic sizes.

    For backends that run a symbolic graph at any size (eager). The graphs are traced at
    sizes inside the ranges (``dcfx.export.program.trace_call``) and checked on the call.
    """

    unet: nn.Module
    branch: int | tuple[int, int]  # a U-Net's branch or a transformer's (first, last)
    backend: str
    options: dict[str, Any]
    dims: dict[str, DimRange]
    from_first_call: tuple[str, ...] = ()  # dimensions static at the first call's sizes

    def bucket(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Hashable:
        """Returns what calls served by one pair share (their input names); refuses sizes out of range."""
        settle_dims(self, names, tensors)
        check_sizes(self.unet, names, tensors, self.dims)
        return ("ranged", names)

    def __call__(
        self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool = False
    ) -> CompiledPair:
        """Returns the pair serving every call inside the ranges, ready to run."""
        settle_dims(self, names, tensors)
        check_sizes(self.unet, names, tensors, self.dims)
        with compile_lock:
            for attempt in range(2):
                traced = _trace_tensors(self.unet, names, tensors, self.dims)
                try:
                    graphs = build_ranged_pair(self.unet, self.branch, names, traced, self.dims, forecast=forecast)
                    break
                except Exception as e:
                    narrowed = narrowed_dims(e, self.dims) if attempt == 0 else None
                    if narrowed is None:
                        raise
                    logger.warning(
                        "dcfx: torch.export cannot trace the whole range; narrowed to %s",
                        {n: d.describe() for n, d in narrowed.items() if d != self.dims[n]},
                    )
                    self.dims = narrowed
            check_sizes(self.unet, names, tensors, self.dims)
            extra = {"forecast": graphs.forecast} if forecast else {}
            return get_backend(self.backend)(graphs.full, graphs.shallow, tensors, **extra, **self.options)


@dataclasses.dataclass
class AheadOfTime:
    """Builds a pair compiled ahead of time by AOTInductor, persisted in ``cache_dir``.

    With ``dims`` one package pair serves every call inside the ranges; without, each input
    signature gets its own (static sizes). A package is found again by a key over what made
    it: the model's class, config and weights (a digest of every parameter and buffer), the
    branch, the sizes, dtype and device, the Inductor settings and the dcfx, torch and
    diffusers versions. Before use a package is checked as ``dcfx.load`` checks an export
    (every file's sha256); an altered one is rebuilt, said in a warning. Without
    ``cache_dir`` the packages live in a temporary directory removed when the process exits.
    """

    unet: nn.Module
    branch: int | tuple[int, int]  # a U-Net's branch or a transformer's (first, last)
    dims: dict[str, DimRange] | None
    cache_dir: Path | None
    inductor_configs: dict[str, Any] = dataclasses.field(default_factory=dict)
    from_first_call: tuple[str, ...] = ()  # dimensions static at the first call's sizes

    def bucket(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Hashable | None:
        """Returns what calls served by one pair share; refuses sizes out of range (None: static)."""
        if self.dims is None:
            return None
        settle_dims(self, names, tensors)
        check_sizes(self.unet, names, tensors, self.dims)
        return ("aoti", names)

    def __call__(
        self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool = False
    ) -> CompiledPair:
        """Returns the loaded package pair for the call (built and cached if missing).

        Every package set holds the forecast graph; with ``forecast`` it is opened too.
        """
        if self.dims is not None:
            settle_dims(self, names, tensors)
            check_sizes(self.unet, names, tensors, self.dims)
            dims = self.dims
            traced = _trace_tensors(self.unet, names, tensors, dims)
        else:
            sizes = call_sizes(self.unet, names, tensors)
            dims = {name: DimRange(name, v, v, v, 1) for name, v in sizes.items()}
            traced = tensors
        shapes = {name: (d.min, d.opt, d.max) for name, d in dims.items()}
        key = self._key(names, tensors, shapes)
        root = self.cache_dir if self.cache_dir is not None else _session_dir()
        directory = root / key
        with compile_lock:
            pair = None
            if directory.exists():
                try:
                    manifest = read_manifest(directory)
                    pair = get_format("aoti").load(directory, manifest, device=tensors[0].device)
                    logger.info("dcfx: loaded compiled graphs from %s", directory)
                except ArtifactError as e:
                    logger.warning("dcfx: the compiled graphs in %s are not usable (%s); compiling again", directory, e)
                    shutil.rmtree(directory, ignore_errors=True)
            if pair is None:
                logger.info("dcfx: compiling the graphs ahead of time into %s", directory)
                write_export(
                    self.unet,
                    spec_for(self.unet),
                    _config_of(self.branch),
                    directory,
                    "aoti",
                    dims,
                    unflatten(names, traced),
                    options={"inductor_configs": self.inductor_configs or None},
                    overwrite=True,
                )
                pair = get_format("aoti").load(directory, read_manifest(directory), device=tensors[0].device)
            pair.check(names, tensors)
            if forecast:
                pair.open_forecast()
            warm_up(pair, tensors)  # the packages' kernels load now, under compile_lock
            return pair

    def _key(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], shapes: Mapping[str, Any]) -> str:
        spec = spec_for(self.unet)
        described = {
            "cache": CACHE_VERSION,
            "model": spec.describe(self.unet),
            # diffusers' private entries (_use_default_values: a list in set order) vary by process.
            "config": jsonable({k: v for k, v in spec.model_config(self.unet).items() if not str(k).startswith("_")}),
            "weights": weights_digest(self.unet),
            "branch": self.branch,
            "inputs": [[n, str(t.dtype), t.ndim] for n, t in zip(names, tensors, strict=True)],
            "shapes": shapes,
            "device": str(tensors[0].device),
            "inductor": {k: repr(v) for k, v in sorted(self.inductor_configs.items())},
            "versions": [__version__, torch.__version__, _diffusers_version()],
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def narrowed_dims(error: Exception, dims: Mapping[str, DimRange]) -> dict[str, DimRange] | None:
    """Returns ``dims`` narrowed as torch.export's constraint violation suggests, or None.

    torch.export refuses a range that the traced graph does not support whole (it
    specialises sizes 0 and 1, and may bound a size below a static size it meets); its
    message suggests ``batch = Dim('batch', min=2, max=15)``. Only the names dcfx gave it
    (batch, tokens, height_units, width_units) are read.
    """
    message = str(error)
    if "Constraints violated" not in message:
        return None
    narrowed = dict(dims)
    for match in re.finditer(r"(\w+) = Dim\('\w+'(?:, min=(\d+))?(?:, max=(\d+))?\)", message):
        name, lo, hi = match.group(1), match.group(2), match.group(3)
        base = name.removesuffix("_units")
        if base not in narrowed:
            continue
        dim = narrowed[base]
        unit = dim.multiple if name.endswith("_units") else 1
        new_min = max(dim.min, int(lo) * unit) if lo else dim.min
        new_max = min(dim.max, int(hi) * unit) if hi else dim.max
        if new_min > new_max:
            return None
        narrowed[base] = dataclasses.replace(dim, min=new_min, opt=min(max(dim.opt, new_min), new_max), max=new_max)
    return narrowed if narrowed != dict(dims) else None


_SESSION_DIR: Path | None = None


def _session_dir() -> Path:
    global _SESSION_DIR
    if _SESSION_DIR is None:
        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="dcfx-aoti-"))
        atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)  # not left behind in /tmp
    return _SESSION_DIR


def cache_dir_from(value: str | os.PathLike[str] | None) -> Path | None:
    """Returns the cache directory to use: ``value``, else ``$DCFX_CACHE_DIR``, else None."""
    if value is None:
        value = os.environ.get("DCFX_CACHE_DIR") or None
    return None if value is None else Path(value).expanduser()


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """What ``dcfx.compile`` asks a build for: the model, the cut, the backend and the shapes.

    ``dims`` None is the static shape mode (one pair per input signature); ranges are the
    ranged mode. ``from_first_call`` names the dimensions held static at the first call's sizes.
    """

    unet: nn.Module
    branch: int | tuple[int, int]  # a U-Net's branch or a transformer's (first, last)
    backend: str
    options: dict[str, Any]
    dims: dict[str, DimRange] | None = None
    cache_dir: Path | None = None
    from_first_call: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """The shape mode: "static" or "ranged"."""
        return "static" if self.dims is None else "ranged"


# (backend, shape mode) -> the factory of its build; "*" is any backend.
BUILDS: dict[tuple[str, str], Callable[[BuildRequest], Build]] = {}


def register_build(backend: str, mode: str) -> Callable[[Callable[[BuildRequest], Build]], Callable[..., Build]]:
    """Returns a decorator registering a build factory for ``backend`` ("*": any) in shape ``mode``."""
    if mode not in ("static", "ranged"):
        raise ValueError(f"a shape mode is 'static' or 'ranged', got {mode!r}")

    def register(factory: Callable[[BuildRequest], Build]) -> Callable[[BuildRequest], Build]:
        BUILDS[(backend, mode)] = factory
        return factory

    return register


def make_build(request: BuildRequest) -> Build:
    """Returns the build registered for the request's backend and shape mode.

    Raises:
        ValueError: a backend and shape mode that do not go together (naming the backends
            that take the mode), or ``cache_dir`` for a backend that keeps nothing on disk.
        TypeError: an option the chosen build cannot take.
    """
    factory = BUILDS.get((request.backend, request.mode)) or BUILDS.get(("*", request.mode))
    if factory is None:
        takes = sorted(b for b, m in BUILDS if m == request.mode and b in available_backends())
        raise ValueError(
            f"dynamic= (one pair over ranges of sizes) is built for the backends {takes}; backend "
            f"{request.backend!r} compiles static shapes only"
        )
    return factory(request)


def _keeps_nothing(request: BuildRequest) -> None:
    if request.cache_dir is not None:
        raise ValueError(
            f"cache_dir= keeps compiled graphs for the inductor backend; backend {request.backend!r} builds its "
            "graphs in seconds and keeps nothing on disk"
        )


@register_build("*", "static")
def _static(request: BuildRequest) -> Build:
    _keeps_nothing(request)
    return CaptureAndCompile(request.unet, request.branch, request.backend, request.options)


@register_build("eager", "ranged")
def _ranged(request: BuildRequest) -> Build:
    assert request.dims is not None
    _keeps_nothing(request)
    return RangedCapture(
        request.unet, request.branch, request.backend, request.options, dict(request.dims), request.from_first_call
    )


@register_build("inductor", "static")
def _inductor_static(request: BuildRequest) -> Build:
    # Without a cache directory, torch.compile in process; with one, packages kept on disk.
    if request.cache_dir is None:
        return CaptureAndCompile(request.unet, request.branch, request.backend, request.options)
    return _ahead_of_time(request)


@register_build("inductor", "ranged")
def _ahead_of_time(request: BuildRequest) -> Build:
    # Inductor over ranges compiles ahead of time (AOTInductor): one package pair per range.
    if request.options.get("mode") is not None:
        raise TypeError(
            "inductor: mode= is a torch.compile setting; with dynamic= or cache_dir= the graphs are compiled "
            "ahead of time (AOTInductor): pass Inductor settings as options= instead"
        )
    dims = None if request.dims is None else dict(request.dims)
    configs = dict(request.options.get("options") or {})
    return AheadOfTime(request.unet, request.branch, dims, request.cache_dir, configs, request.from_first_call)


def _diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def _config_of(cut: int | tuple[int, int]) -> DeepCacheConfig:
    """The config that cuts where ``cut`` says (what an ahead-of-time export records)."""
    if isinstance(cut, tuple):
        return DeepCacheConfig(first=cut[0], last=cut[1])
    return DeepCacheConfig(branch=cut)
