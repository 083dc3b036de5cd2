"""What the engine serves: a denoiser with its schedulers, and how a request becomes model rows.

``DigitsServeModel`` serves the bundled digits model (requests name class labels);
``UNetServeModel`` any diffusers U-Net from a folder, ``TransformerServeModel`` any diffusion
transformer dcfx cuts (requests carry conditioning tensors, results are latents: the
transformer's own sample, Flux's packed tokens as they are). ``load_serve_model("digits" |
PATH)`` picks one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcfx.models import TransformerSpec, spec_for
from dcfx.models.transformer import UNBATCHED
from dcfx.serve.request import GenerationRequest
from dcfx.serve.schedulers import available_schedulers, make_scheduler

# Requests may ask for samples up to this many times the model's sample_size per side.
MAX_SIZE_FACTOR = 4


def _identity(output: torch.Tensor) -> torch.Tensor:
    return output


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedRequest:
    """A request as model rows: its initial noise, its conditioning, and how the model takes them.

    Attributes:
        noise: The initial noise (images, channels, height, width; a transformer's sample
            layout), before the scheduler's ``init_noise_sigma``.
        conditioning: Model keyword inputs, one row per model row: the images' conditional
            rows, then (guided requests) their unconditional rows.
        rows: Model rows per step: the images, twice that when guided.
        shared: Inputs that every row of a call shares, passed once (Flux's token positions,
            constant arguments): requests batch together only where these are equal.
        sample_input: The forward's name of the sample ("sample"; "hidden_states").
        timestep_divisor: What the timestep is divided by before the call (Flux: 1000).
        prediction: The noise prediction of the model's output rows (a transformer with a
            learned variance: its first half of the channels).
    """

    noise: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    rows: int
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sample_input: str = "sample"
    timestep_divisor: float = 1.0
    prediction: Callable[[torch.Tensor], torch.Tensor] = _identity

    def shared_key(self) -> tuple[Any, ...]:
        """Returns what identifies ``shared``: names, and each tensor's shape, dtype and bytes (else its repr)."""
        out = []
        for name, value in sorted(self.shared.items()):
            if isinstance(value, torch.Tensor):
                digest = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                out.append((name, tuple(value.shape), str(value.dtype), digest))
            else:
                out.append((name, repr(value)))
        return tuple(out)


class ServeModel:
    """A U-Net the engine can serve: its schedulers, its sizes, and request preparation.

    Attributes:
        name: What the server calls the model ("digits", or the folder).
        unet: The plain U-Net (the engine's runtime wraps it).
        scheduler_config: The scheduler config every scheduler is built from.
    """

    name: str
    unet: nn.Module
    scheduler_config: Mapping[str, Any]

    @property
    def gives_images(self) -> bool:
        """Whether results are images that ``png`` can encode (else latents only)."""
        return False

    def sample_size(self) -> tuple[int, int]:
        """Returns the default (height, width): the U-Net's ``sample_size``."""
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def size_of(self, request: GenerationRequest) -> tuple[int, int]:
        """Returns the (height, width) of ``request``, checked against the model's limits."""
        size = request.size or self.sample_size()
        limit = MAX_SIZE_FACTOR * max(self.sample_size())
        if max(size) > limit:
            raise ValueError(f"size {size} is larger than this server allows for {self.name}: at most {limit} per side")
        return size

    def scheduler(self, name: str) -> Any:
        """Returns a fresh scheduler of kind ``name`` (ValueError naming the valid kinds)."""
        return make_scheduler(name, self.scheduler_config)

    def check_scheduler(self, name: str) -> None:
        """Raises ValueError unless ``name`` is a registered scheduler kind this model's config can run."""
        if name not in available_schedulers():
            raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(available_schedulers())}")
        self._check_schedule(name)

    def _check_schedule(self, name: str) -> None:
        """Raises ValueError for a scheduler that shifts its timesteps by the image size (Flux's)."""
        scheduler = self.scheduler(name)
        if scheduler.config.get("use_dynamic_shifting"):
            # Its pipeline passes the shift ("mu") from the image's token count; the engine sets a
            # schedule by the number of steps only, so it would run another schedule (or fail).
            raise ValueError(
                f"scheduler {name!r} ({type(scheduler).__name__}) of {self.name} shifts its timesteps by the image "
                "size (use_dynamic_shifting); the server sets a schedule by its number of steps only: not served"
            )

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Returns the request's noise and conditioning rows (ValueError/TypeError for a bad request)."""
        raise NotImplementedError

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """Returns the final sample as the result carries it (float32, CPU)."""
        return latents.float().cpu()

    def png(self, latents: torch.Tensor) -> bytes:
        """Returns the images of a result as one PNG, side by side (ValueError for a latent-only model)."""
        raise ValueError(f"{self.name} gives latents only (its samples are not images): ask for output 'latents'")

    def _noise(self, request: GenerationRequest, images: int) -> torch.Tensor:
        height, width = self.size_of(request)
        generator = torch.Generator().manual_seed(request.seed)
        channels = int(self.unet.config.in_channels)
        noise = torch.randn(images, channels, height, width, generator=generator)
        return noise.to(device=self.unet.device, dtype=self.unet.dtype)


class DigitsServeModel(ServeModel):
    """The bundled digits model (``dcfx.digits``): requests name digits; results are 1-channel images.

    A request's noise and conditioning are those of ``dcfx.digits.generate`` for the same
    labels and seed, so served images equal offline ones (see ``dcfx.serve.engine``).
    """

    def __init__(self, model: Any, name: str = "digits") -> None:
        self.name = name
        self.model = model
        self.unet = model.unet
        self.scheduler_config = dict(model.scheduler_config)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:  # noqa: D102
        from dcfx.digits import NULL_CLASS, NUM_CLASSES

        if request.labels is None:
            raise ValueError(f"the {self.name} model takes labels (digits 0..{NUM_CLASSES - 1}), not conditioning")
        bad = [v for v in request.labels if not 0 <= v < NUM_CLASSES]
        if bad:
            raise ValueError(f"labels must be digits 0..{NUM_CLASSES - 1}, got {list(request.labels)}")
        labels = torch.tensor(request.labels)
        if request.guided:
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        with torch.no_grad():
            tokens = self.model.tokens(labels.to(self.unet.device)).to(self.unet.dtype)
        noise = self._noise(request, len(request.labels))
        return PreparedRequest(noise, {"encoder_hidden_states": tokens}, len(labels))

    @property
    def gives_images(self) -> bool:  # noqa: D102
        return True

    def finish(self, latents: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return latents.clamp(-1, 1).float().cpu()

    def png(self, latents: torch.Tensor) -> bytes:  # noqa: D102
        return images_png(latents)


class UNetServeModel(ServeModel):
    """Any diffusers U-Net: requests carry its conditioning inputs as tensors; results are latents."""

    def __init__(self, unet: nn.Module, scheduler_config: Mapping[str, Any], name: str) -> None:
        self.name = name
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:  # noqa: D102
        if request.labels is not None:
            raise ValueError(f"{self.name} takes conditioning tensors, not labels (labels are for the digits model)")
        cond = dict(request.conditioning or {})
        images = next(iter(cond.values())).shape[0] if cond else 1
        accepted = self.conditioning_inputs()
        for key, value in cond.items():
            if key.partition(".")[0] not in accepted:  # "added_cond_kwargs.text_embeds": a dict input's entry
                raise ValueError(f"{self.name} takes no input {key!r}; conditioning inputs: {', '.join(accepted)}")
            if value.shape[0] != images:
                raise ValueError(
                    f"conditioning {key!r} has {value.shape[0]} rows, other inputs {images}: one row per image"
                )
        if request.guided:
            negative = dict(request.negative_conditioning or {})
            if set(negative) != set(cond) or any(negative[k].shape != cond[k].shape for k in cond):
                raise ValueError(
                    f"guidance {request.guidance} needs negative_conditioning with the keys and shapes of conditioning "
                    f"({ {k: tuple(v.shape) for k, v in cond.items()} })"
                )
            cond = {k: torch.cat([cond[k], negative[k]]) for k in cond}
        device, dtype = self.unet.device, self.unet.dtype
        cond = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in cond.items()}
        rows = images * (2 if request.guided else 1)
        return self._prepared(request, images, cond, rows)

    def conditioning_inputs(self) -> list[str]:
        """Returns the forward's inputs a request may carry: all but the sample and the timestep."""
        return [n for n in _forward_inputs(self.unet) if n not in ("sample", "timestep")]

    def _prepared(self, request: GenerationRequest, images: int, cond: dict[str, torch.Tensor], rows: int) -> Any:
        return PreparedRequest(self._noise(request, images), cond, rows)

    @property
    def gives_images(self) -> bool:
        """Whether the U-Net's samples are images: 1 or 3 channels (a pixel-space model's in [-1, 1])."""
        return int(self.unet.config.out_channels) in (1, 3)

    def png(self, latents: torch.Tensor) -> bytes:  # noqa: D102
        if not self.gives_images:
            return super().png(latents)
        return images_png(latents)


class TransformerServeModel(UNetServeModel):
    """A diffusion transformer (SD3, Flux, PixArt, DiT, ...): conditioning tensors in, its sample out.

    Requests carry the per-image inputs (``encoder_hidden_states``, ``pooled_projections``,
    ``class_labels``, ...); the model makes what every row shares, as its pipeline does:
    Flux's token positions (``img_ids`` from the size, ``txt_ids`` zeros) and PixArt's empty
    ``added_cond_kwargs`` (unless the request carries its entries, ``added_cond_kwargs.resolution``
    and ``added_cond_kwargs.aspect_ratio``, one row per image: PixArt-alpha 1024's
    micro-conditioning). The noise has the transformer's sample layout at the request's
    latent size (Flux: packed tokens); the result is the final sample in that layout. Of an
    output with twice the sample's channels (a learned variance) the first half steps the
    sampler. Flow-matching models (SD3, Flux) want requests with ``scheduler`` "flow".
    """

    # Inputs the model makes itself, or that change how it runs rather than what it sees.
    MADE = (
        *("return_dict", "joint_attention_kwargs", "cross_attention_kwargs", "skip_layers"),
        *UNBATCHED,
    )

    def __init__(self, unet: nn.Module, scheduler_config: Mapping[str, Any], name: str) -> None:
        super().__init__(unet, scheduler_config, name)
        spec = spec_for(unet)
        if not isinstance(spec, TransformerSpec):
            raise TypeError(f"{type(unet).__name__} is not a diffusion transformer: serve it with UNetServeModel")
        self.spec = spec

    def sample_size(self) -> tuple[int, int]:
        """Returns the default (height, width) of the latents: the model's ``sample_size`` (Flux: 64)."""
        size = self.spec.default_size(self.unet)
        return size, size

    def conditioning_inputs(self) -> list[str]:  # noqa: D102
        taken = (self.spec.sample_input, self.spec.timestep_input, *self.MADE)
        return [n for n in _forward_inputs(self.unet) if n not in taken and not n.startswith(("controlnet", "block"))]

    def _prepared(self, request: GenerationRequest, images: int, cond: dict[str, torch.Tensor], rows: int) -> Any:
        noise = self._noise(request, images)
        dim = self.spec.sample_dims.index("channels")
        channels = noise.shape[dim]
        return PreparedRequest(
            noise,
            cond,
            rows,
            shared=self._shared(self.size_of(request), noise, cond),
            sample_input=self.spec.sample_input,
            timestep_divisor=self.spec.timestep_divisor,
            prediction=lambda out: out.narrow(dim, 0, channels) if out.shape[dim] == 2 * channels else out,
        )

    def _shared(self, size: tuple[int, int], noise: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        inputs = _forward_inputs(self.unet)
        shared: dict[str, Any] = {}
        if "added_cond_kwargs" in inputs and not any(k.startswith("added_cond_kwargs.") for k in cond):
            shared["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}  # PixArt without micro-conditions
        if "img_ids" in inputs:  # Flux: (row, column) of each 2x2 latent patch; text tokens at 0
            height, width = size
            ids = torch.zeros(height // 2, width // 2, 3)
            ids[..., 1] += torch.arange(height // 2)[:, None]
            ids[..., 2] += torch.arange(width // 2)[None, :]
            shared["img_ids"] = ids.reshape(-1, 3).to(device=noise.device, dtype=noise.dtype)
            text = cond.get(self.spec.context_input)
            tokens = 0 if text is None else text.shape[1]
            shared["txt_ids"] = torch.zeros(tokens, 3, device=noise.device, dtype=noise.dtype)
        return shared

    def _noise(self, request: GenerationRequest, images: int) -> torch.Tensor:
        height, width = self.size_of(request)
        shape = self.spec.sample_shape(self.unet, images, height, width)
        self.spec.check_sample_shape(self.unet, shape)
        generator = torch.Generator().manual_seed(request.seed)
        noise = torch.randn(shape, generator=generator)
        return noise.to(device=self.unet.device, dtype=self.unet.dtype)

    @property
    def gives_images(self) -> bool:
        """A transformer's samples are latents."""
        return False


def _forward_inputs(unet: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(type(unet).forward).parameters)[1:]


def images_png(images: torch.Tensor) -> bytes:
    """Returns images (B, 1 or 3, H, W) in [-1, 1] as one PNG, side by side, at their own pixel size."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    row = torch.cat(list(pixels), dim=2)  # (C, H, B * W)
    array = row[0].numpy() if row.shape[0] == 1 else row.permute(1, 2, 0).contiguous().numpy()
    out = io.BytesIO()
    Image.fromarray(array, mode="L" if row.shape[0] == 1 else "RGB").save(out, format="PNG")
    return out.getvalue()


def load_serve_model(model: str) -> ServeModel:
    """Returns the model to serve: "digits" (bundled), a digits-style folder, or a diffusers folder.

    A diffusers folder is a pipeline folder (``unet/`` or ``transformer/``, and ``scheduler/``)
    or the model's own folder (``config.json``; its scheduler is then the scheduler kind's
    default config). A diffusion transformer is served by ``TransformerServeModel``.

    Raises:
        ValueError: ``model`` is none of these, or its config names no diffusers model class.
    """
    from dcfx.digits import load_model

    if model == "digits":
        return DigitsServeModel(load_model())
    path = Path(model)
    if (path / "class_tokens.safetensors").is_file():
        return DigitsServeModel(load_model(path), name=str(path))
    model_dir = path
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").is_file():
            model_dir = path / sub
            break
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model {model!r} is neither 'digits' nor a diffusers folder (no config.json, unet/config.json or "
            "transformer/config.json)"
        )
    import diffusers

    name = json.loads((model_dir / "config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{model_dir}/config.json names {name!r}, which is not a diffusers model class")
    unet = cls.from_pretrained(model_dir).eval()
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        transformer = isinstance(spec_for(unet), TransformerSpec)
    except TypeError:
        transformer = False  # not a model dcfx cuts: compiling it says so, naming the supported ones
    if transformer:
        return TransformerServeModel(unet, config, name=str(path))
    return UNetServeModel(unet, config, name=str(path))
