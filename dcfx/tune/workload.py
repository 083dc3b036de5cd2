"""What ``dcfx tune`` runs: a model, its calibration inputs, the sampling loop, and the runtimes.

A workload is a U-Net (the bundled digits model, a built-in config, a diffusers folder) or a
diffusion transformer (a diffusers folder: the transformer's own, or a pipeline's with a
``transformer/`` subfolder), with the sampling loop its pipelines run (``generate``,
``generate_transformer``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcfx.api import compile as dcfx_compile
from dcfx.config import DeepCacheConfig
from dcfx.models import TransformerSpec, spec_for
from dcfx.models.transformer import UNBATCHED
from dcfx.runtime import DeepCacheUNet
from dcfx.zoo import BUNDLED, load_unet

# "flow": the flow-matching Euler sampler of SD3, Flux and Wan pipelines.
SCHEDULERS = ("ddim", "dpm", "euler", "flow")

Batch = tuple[torch.Tensor, dict[str, Any]]  # initial noise, conditioning (tensors; a transformer's constants too)


class Workload:
    """A model and the generations the tuner runs: inputs per calibration seed and a sampling loop."""

    name: str
    unet: nn.Module

    def scheduler(self) -> Any:
        """Returns a fresh scheduler of the requested kind."""
        raise NotImplementedError

    def inputs(self, seeds: Sequence[int], size: int) -> Batch:
        """Returns the initial noise and the conditioning of a batch, one sample per seed."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Returns what identifies the workload (for the cache key and the report)."""
        raise NotImplementedError

    def sample(self, model: nn.Module, scheduler: Any, noise: torch.Tensor, cond: dict[str, Any], steps: int) -> Any:
        """Returns the final sample of one generation with ``model`` (the plain model or a dcfx runtime)."""
        return generate(model, scheduler, noise, cond, steps)


def scheduler_class(name: str) -> Any:
    """Returns the diffusers scheduler class of ``name`` ("ddim", "dpm" or "euler")."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "flow": diffusers.FlowMatchEulerDiscreteScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return classes[name]


class DigitsWorkload(Workload):
    """The bundled digits model; calibration seed s draws digit s % 10 from noise seeded with s.

    Every sampler is built from the model's DDIM config with ``timestep_spacing="leading"``
    (as DDIM's own config has, and as ``benchmarks/quality.py`` builds them): the default
    ``linspace`` grid of DPM-Solver and Euler starts at t = 999, where this model's alpha_bar is
    about 2e-9, and the samples saturate.
    """

    def __init__(self, scheduler: str) -> None:
        from dcfx.digits import load_model

        self.name = BUNDLED
        self._scheduler_cls = scheduler_class(scheduler)
        self._scheduler_name = scheduler
        self.model = load_model()
        self.unet = self.model.unet

    def scheduler(self) -> Any:  # noqa: D102
        return self._scheduler_cls.from_config(self.model.scheduler().config, timestep_spacing="leading")

    def inputs(self, seeds: Sequence[int], size: int) -> Batch:  # noqa: D102
        from dcfx.digits import NUM_CLASSES

        noise = torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        labels = torch.tensor([s % NUM_CLASSES for s in seeds])
        with torch.no_grad():
            return noise, {"encoder_hidden_states": self.model.tokens(labels)}

    def describe(self) -> dict[str, Any]:  # noqa: D102
        described = {"model": BUNDLED, "scheduler": self._scheduler_name}
        if self._scheduler_name != "ddim":  # DDIM's config was "leading" already: its cached results stand
            described["timestep_spacing"] = "leading"
        return described


class FolderWorkload(Workload):
    """A U-Net that ``dcfx.zoo.load_unet`` loads (a built-in config or a diffusers folder).

    The conditioning is seeded random embeddings: no text encoder is needed, and each
    calibration seed draws its own (77 tokens of the model's cross-attention width), so
    fidelity to no cache is measured on as many different conditions as seeds. A folder's
    ``scheduler/`` configures the scheduler.
    """

    def __init__(self, model: str, scheduler: str, denoiser: nn.Module | None = None) -> None:
        self.name = model
        self.unet = load_unet(model) if denoiser is None else denoiser
        self._scheduler_cls = scheduler_class(scheduler)
        self._scheduler_name = scheduler
        folder = Path(model) / "scheduler"
        self._scheduler_config = self._scheduler_cls.load_config(folder) if folder.is_dir() else None

    def scheduler(self) -> Any:  # noqa: D102
        if self._scheduler_config is not None:
            return self._scheduler_cls.from_config(self._scheduler_config)
        return self._scheduler_cls()

    def inputs(self, seeds: Sequence[int], size: int) -> Batch:  # noqa: D102
        spec = spec_for(self.unet)
        param = next(self.unet.parameters())
        calls = []
        for s in seeds:
            with torch.random.fork_rng():
                torch.manual_seed(s)
                calls.append(
                    spec.example_call(self.unet, spec.sample_shape(self.unet, 1, size, size), param.dtype, param.device)
                )
        noise = torch.cat([c.pop("sample") for c in calls])
        for c in calls:
            c.pop("timestep")
        cond = {k: torch.cat([c[k] for c in calls]) for k in calls[0] if isinstance(calls[0][k], torch.Tensor)}
        return noise, cond

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {"model": self.name, "scheduler": self._scheduler_name}


class TransformerWorkload(FolderWorkload):
    """A diffusion transformer from a diffusers folder, sampled as its pipelines sample it.

    Each calibration seed draws its own conditioning (``TransformerSpec.example_call`` under
    that seed, what the model's pipeline passes: 8 prompt tokens of the model's text width,
    their mask, pooled projections, an embedded guidance scale) and, for a class-conditional
    model (DiT), class ``seed % classes``. Token positions (Flux's ``img_ids``, ``txt_ids``)
    and constant arguments are shared by the batch. A folder's ``scheduler/`` configures the
    scheduler; flow-matching models (SD3, Flux) want ``scheduler="flow"``.
    """

    def inputs(self, seeds: Sequence[int], size: int) -> Batch:  # noqa: D102
        model = self.unet
        spec = spec_for(model)
        param = next(model.parameters())
        classes = getattr(model.config, "num_embeds_ada_norm", None) or 1
        calls = []
        for s in seeds:
            with torch.random.fork_rng():
                torch.manual_seed(s)
                call = spec.example_call(model, spec.sample_shape(model, 1, size, size), param.dtype, param.device)
            if "class_labels" in call:
                call["class_labels"] = torch.full_like(call["class_labels"], s % classes)
            calls.append(call)
        noise = torch.cat([c.pop(spec.sample_input) for c in calls])
        cond: dict[str, Any] = {}
        for key, value in calls[0].items():
            if key == spec.timestep_input:
                continue
            batched = isinstance(value, torch.Tensor) and key not in UNBATCHED
            cond[key] = torch.cat([c[key] for c in calls]) if batched else value
        return noise, cond

    def sample(self, model: nn.Module, scheduler: Any, noise: torch.Tensor, cond: dict[str, Any], steps: int) -> Any:  # noqa: D102
        return generate_transformer(model, spec_for(self.unet), scheduler, noise, cond, steps)


def load_workload(model: str, scheduler: str = "ddim") -> Workload:
    """Returns the workload of ``model``: "digits" (bundled), a built-in config name, or a diffusers folder.

    A folder holding a diffusion transformer (or a pipeline's ``transformer/``) gives a
    ``TransformerWorkload``.

    Raises:
        ValueError: an unknown model or scheduler (``dcfx.zoo.load_unet`` says which models exist).
        TypeError: a folder whose model class dcfx does not support.
    """
    if model == BUNDLED:
        return DigitsWorkload(scheduler)
    denoiser = load_unet(model)
    if isinstance(spec_for(denoiser), TransformerSpec):
        return TransformerWorkload(model, scheduler, denoiser)
    return FolderWorkload(model, scheduler, denoiser)


@torch.no_grad()
def generate(
    unet: nn.Module, scheduler: Any, noise: torch.Tensor, cond: dict[str, torch.Tensor], steps: int
) -> torch.Tensor:
    """Returns the final sample of a sampling loop from ``noise`` (a dcfx runtime or the plain U-Net)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, **cond).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


@torch.no_grad()
def generate_transformer(
    model: nn.Module, spec: TransformerSpec, scheduler: Any, noise: torch.Tensor, cond: dict[str, Any], steps: int
) -> torch.Tensor:
    """Returns the final sample of a diffusion transformer's sampling loop (a dcfx runtime or the plain model).

    As diffusers' transformer pipelines call it: keyword inputs, the timestep per row (divided
    by ``spec.timestep_divisor``, Flux's 1000, in the sample's dtype), and of an output with twice the sample's
    channels (a learned variance: PixArt, DiT) the first half. Flow-matching schedulers have no
    ``init_noise_sigma`` or ``scale_model_input``: both are then the identity.
    """
    scheduler.set_timesteps(steps)
    sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    x = noise * sigma
    channels = spec.sample_dims.index("channels")
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        timestep = t.expand(x.shape[0])
        if spec.timestep_divisor != 1:
            timestep = timestep.to(x.dtype) / spec.timestep_divisor
        out = model(**{spec.sample_input: x_in, spec.timestep_input: timestep}, **cond, return_dict=False)[0]
        out = prediction(out, x.shape[channels], channels)
        x = scheduler.step(out, t, x).prev_sample
    return x


def prediction(output: torch.Tensor, channels: int, dim: int) -> torch.Tensor:
    """Returns the noise prediction of a model output: its first ``channels`` along ``dim`` (a variance may follow)."""
    return output.narrow(dim, 0, channels) if output.shape[dim] == 2 * channels else output


class Runner:
    """Runs a workload's calibration batches: plainly, or through one dcfx runtime per cut and forecast mode.

    Each runtime is built (and compiled) and warmed up untimed on first use; it then serves
    every schedule and step count of its cut (branch, or block range) without new graphs (``reschedule``). Forecast
    modes get runtimes of their own: switching forecasting on or off rebuilds a runtime's
    graphs, which interleaved rounds would otherwise do at every switch. ``close`` drops them.
    """

    def __init__(self, work: Workload, seeds: int, batch: int, size: int, steps: int, backend: str) -> None:
        self.work = work
        self.batch = batch
        self.steps = steps
        self.backend = backend
        seed_list = list(range(seeds))
        self._chunks = [seed_list[i : i + batch] for i in range(0, seeds, batch)]
        self._size = size
        self._batches: list[Batch] | None = None
        self._reference: list[torch.Tensor] | None = None
        self._plain_scheduler = work.scheduler()
        self._runtimes: dict[tuple[Any, str], DeepCacheUNet] = {}

    @property
    def batches(self) -> list[Batch]:
        """The calibration batches (made on first use)."""
        if self._batches is None:
            self._batches = [self.work.inputs(c, self._size) for c in self._chunks]
        return self._batches

    def reference(self) -> list[torch.Tensor]:
        """Returns the no-cache outputs of every batch (made once; this also warms the plain U-Net up)."""
        if self._reference is None:
            self._reference = [self._plain(b)() for b in self.batches]
        return self._reference

    def runtime(self, config: DeepCacheConfig) -> DeepCacheUNet:
        """Returns the runtime of ``config``'s cut and forecast mode, switched to ``config``."""
        slot = (config.cut, config.forecast)
        fast = self._runtimes.get(slot)
        if fast is None:
            fast = dcfx_compile(self.work.unet, config, backend=self.backend, scheduler=self.work.scheduler())
            self._runtimes[slot] = fast
            self.work.sample(fast, fast.scheduler, *self.batches[0], steps=self.steps)
        return fast.reschedule(config)

    def outputs(self, config: DeepCacheConfig, steps: int | None = None) -> tuple[list[torch.Tensor], list[float]]:
        """Returns the outputs of every batch under ``config`` at ``steps`` (default: the reference's), timed."""
        outs, times = [], []
        for b in self.batches:
            run = self._cached(config, b, steps)
            start = time.perf_counter()
            outs.append(run())
            times.append(time.perf_counter() - start)
        return outs, times

    def plain_run(self, r: int) -> Callable[[], torch.Tensor]:
        """Returns round ``r``'s no-cache generation (batch r mod the number of batches), ready to time."""
        return self._plain(self.batches[r % len(self.batches)])

    def cached_run(
        self, config: DeepCacheConfig, steps: int | None = None
    ) -> Callable[[int], Callable[[], torch.Tensor]]:
        """Returns the preparation of round r's generation under ``config`` at ``steps``, for ``time_interleaved``."""
        return lambda r: self._cached(config, self.batches[r % len(self.batches)], steps)

    def close(self) -> None:
        """Drops every runtime's graphs."""
        for fast in self._runtimes.values():
            fast.clear_graphs()
        self._runtimes.clear()

    def _plain(self, b: Batch) -> Callable[[], torch.Tensor]:
        return functools.partial(self.work.sample, self.work.unet, self._plain_scheduler, *b, self.steps)

    def _cached(self, config: DeepCacheConfig, b: Batch, steps: int | None) -> Callable[[], torch.Tensor]:
        fast = self.runtime(config)
        return functools.partial(self.work.sample, fast, fast.scheduler, *b, steps or self.steps)
