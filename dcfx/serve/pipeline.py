"""Whole pipelines served by prompt: text encoding and VAE decoding around the denoiser.

A diffusers pipeline folder (``save_pretrained``) whose pipeline class has a registered
*family* is served by prompt: ``PipelineServeModel`` loads it, and its family says how texts
become the denoiser's conditioning rows (``encode``) and latents become images (``decode``),
as the pipeline's own ``__call__`` does, so that a served image equals the pipeline's image
for the same prompt, seed and dcfx config (up to the kernels' rounding by batch size:
``dcfx.serve.engine``). Between them the denoiser runs on the step-batching engine as a
``UNetServeModel`` (requests carry the conditioning tensors the encoder made).

Families: ``StableDiffusionPipeline`` (SD 1.x and 2.x, epsilon or v-prediction),
``StableDiffusionXLPipeline`` (SDXL base: two text encoders, pooled embeddings and size
micro-conditioning), ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` (a T5 encoder with
its attention mask, 120 and 300 tokens; PixArt-alpha 1024's resolution and aspect-ratio
micro-conditioning; the denoiser a transformer cut by ``first``/``last``) and
``StableDiffusion3Pipeline`` (SD3, SD3.5: two CLIP encoders and T5, or T5's zeros where the
folder has no T5, as the pipeline; flow matching with the folder's scheduler). A PixArt image
equals the pipeline's with ``use_resolution_binning=False``: the server generates at the size
asked, it does not snap it to the model's aspect-ratio bins and resize back. Other pipelines
(Flux, Sana, SDXL refiners) are served as their denoiser, with conditioning tensors in and
latents out, until their family is registered (``register_family``).

The safety checker is not loaded or run: a served image is the pipeline's image with
``safety_checker=None``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dcfx.registry import Registry
from dcfx.serve.models import ServeModel, TransformerServeModel, UNetServeModel, load_serve_model
from dcfx.serve.request import GenerationRequest
from dcfx.serve.schedulers import available_schedulers, make_scheduler

logger = logging.getLogger(__name__)

# The scheduler kind that names the pipeline folder's own scheduler (its class and config).
OWN_SCHEDULER = "pipeline"


@dataclasses.dataclass(frozen=True)
class PipelineFamily:
    """How one kind of pipeline turns texts into conditioning rows and latents into images.

    Attributes:
        denoiser: The pipeline's attribute holding the denoiser ("unet", "transformer").
        encode: ``encode(pipe, texts) -> {input name: rows}``: one row per text, as the
            pipeline's ``encode_prompt`` makes them (a negative prompt is a text like any other).
        decode: ``decode(pipe, latents) -> images``: PIL images of the final latents, as the
            pipeline's ``__call__`` makes them.
        load_kwargs: Passed to ``from_pretrained`` (leaving out the safety checker).
        guidance: The pipeline's default guidance scale.
        steps: The pipeline's default number of steps.
        size_inputs: ``size_inputs(pipe, height, width) -> {input name: one row}``: inputs of
            every row that depend on the image size only (SDXL's micro-conditioning time ids).
        zero_negative: ``zero_negative(pipe)``: whether a request without a negative prompt is
            guided by zero embeddings rather than the empty prompt's (SDXL's
            ``force_zeros_for_empty_prompt``).
        components: The folder's components a prompt needs (others may be absent: SD3's T5).
        min_steps: The fewest steps a request may ask for (PixArt's pipeline returns another
            output of the scheduler at one step, which the server does not).
    """

    denoiser: str
    encode: Callable[[Any, list[str]], dict[str, torch.Tensor]]
    decode: Callable[[Any, torch.Tensor], list[Any]]
    load_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    guidance: float = 7.5
    steps: int = 50
    size_inputs: Callable[[Any, int, int], dict[str, torch.Tensor]] | None = None
    zero_negative: Callable[[Any], bool] = lambda pipe: False
    components: tuple[str, ...] = ("tokenizer", "text_encoder", "vae")
    min_steps: int = 1


_FAMILIES: Registry[PipelineFamily] = Registry("pipeline family")


def register_family(pipeline_class: str, family: PipelineFamily) -> None:
    """Registers how pipelines of class ``pipeline_class`` (the model_index.json name) are served by prompt."""
    _FAMILIES.add(pipeline_class, family)


def served_families() -> list[str]:
    """Returns the pipeline classes served by prompt."""
    return _FAMILIES.names()


def _sd_encode(pipe: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    embeds, _ = pipe.encode_prompt(texts, pipe.unet.device, 1, False)
    return {"encoder_hidden_states": embeds}


def _sd_decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * images.shape[0])


register_family(
    "StableDiffusionPipeline",
    PipelineFamily(
        denoiser="unet",
        encode=_sd_encode,
        decode=_sd_decode,
        load_kwargs={"safety_checker": None, "requires_safety_checker": False},
    ),
)


def _sdxl_encode(pipe: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(texts, device=pipe.unet.device, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs.text_embeds": pooled}


def _sdxl_time_ids(pipe: Any, height: int, width: int) -> dict[str, torch.Tensor]:
    # The pipeline's defaults: original and target size the image's, no crop.
    encoder_2 = pipe.text_encoder_2
    ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=pipe.unet.dtype,
        text_encoder_projection_dim=None if encoder_2 is None else encoder_2.config.projection_dim,
    )
    return {"added_cond_kwargs.time_ids": ids.to(pipe.unet.device)}


def _sdxl_decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    config = pipe.vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    images = pipe.vae.decode(latents, return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        images = pipe.watermark.apply_watermark(images)
    return pipe.image_processor.postprocess(images, output_type="pil")


register_family(
    "StableDiffusionXLPipeline",
    PipelineFamily(
        denoiser="unet",
        encode=_sdxl_encode,
        decode=_sdxl_decode,
        guidance=5.0,
        size_inputs=_sdxl_time_ids,
        zero_negative=lambda pipe: bool(pipe.config.force_zeros_for_empty_prompt),
    ),
)


def _pixart_encoder(max_tokens: int) -> Callable[[Any, list[str]], dict[str, torch.Tensor]]:
    def encode(pipe: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        from diffusers.utils import is_bs4_available, is_ftfy_available

        # The pipeline's default clean_caption=True takes effect only where bs4 and ftfy are installed.
        embeds, mask, _, _ = pipe.encode_prompt(
            texts,
            do_classifier_free_guidance=False,
            device=pipe.transformer.device,
            clean_caption=is_bs4_available() and is_ftfy_available(),
            max_sequence_length=max_tokens,
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    return encode


def _pixart_micro_conditions(pipe: Any, height: int, width: int) -> dict[str, torch.Tensor]:
    # PixArt-alpha at 1024 (sample_size 128) is conditioned on the image's size and aspect ratio.
    if pipe.transformer.config.sample_size != 128:
        return {}
    dtype, device = pipe.text_encoder.dtype, pipe.transformer.device
    return {
        "added_cond_kwargs.resolution": torch.tensor([[height, width]], dtype=dtype, device=device),
        "added_cond_kwargs.aspect_ratio": torch.tensor([[float(height / width)]], dtype=dtype, device=device),
    }


_PIXART = (("PixArtAlphaPipeline", 120, _pixart_micro_conditions), ("PixArtSigmaPipeline", 300, None))
for _name, _tokens, _micro in _PIXART:
    register_family(
        _name,
        PipelineFamily(
            denoiser="transformer",
            encode=_pixart_encoder(_tokens),
            decode=_sd_decode,
            guidance=4.5,
            steps=20,
            size_inputs=_micro,
            min_steps=2,
        ),
    )


def _sd3_encode(pipe: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    # Both CLIP encoders, and the T5 encoder's tokens (zeros when the folder has no T5, as the pipeline).
    embeds, _, pooled, _ = pipe.encode_prompt(
        texts, None, None, device=pipe.transformer.device, do_classifier_free_guidance=False
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _sd3_decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    config = pipe.vae.config
    images = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")


register_family(
    "StableDiffusion3Pipeline",
    PipelineFamily(
        denoiser="transformer",
        encode=_sd3_encode,
        decode=_sd3_decode,
        guidance=7.0,
        steps=28,
        components=("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"),
    ),
)


def pipeline_class_of(folder: Path) -> str | None:
    """Returns the pipeline class a folder's model_index.json names (None: not a pipeline folder)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text()).get("_class_name")


def _saved_as_none(index: dict[str, Any]) -> set[str]:
    """Returns the components a model_index.json saved as None (SD3 without its T5)."""
    return {k for k, v in index.items() if isinstance(v, list) and v[-1] is None}


def prompt_servable(folder: Path) -> tuple[bool, str]:
    """Returns whether ``folder`` is served by prompt, and why not when it is not."""
    name = pipeline_class_of(folder)
    if name is None:
        return False, f"{folder} has no model_index.json (not a pipeline folder)"
    if name not in _FAMILIES.names():
        return False, f"{name} is not served by prompt yet (served: {', '.join(served_families())})"
    index = json.loads((folder / "model_index.json").read_text())
    absent = _saved_as_none(index)
    missing = [c for c in _FAMILIES.get(name).components if c not in index or c in absent]
    if missing:
        return False, f"the pipeline in {folder} has no {', '.join(missing)}"
    return True, ""


class PipelineServeModel(UNetServeModel):
    """A diffusers pipeline served by prompt: its encoder, its denoiser on the engine, its VAE.

    The engine sees the denoiser (``unet``) with conditioning tensors, as ``UNetServeModel``
    (a transformer pipeline's as ``TransformerServeModel``: ``TransformerPipelineServeModel``);
    ``encode`` and ``decode`` run in their own batching stages (``dcfx.serve.service``).
    Requests may name the folder's own scheduler as "pipeline" (the default of the images
    API) besides the registered kinds.

    Args:
        pipe: The loaded pipeline.
        family: How it encodes and decodes.
        name: What the server calls it (the folder).
    """

    def __init__(self, pipe: Any, family: PipelineFamily, name: str) -> None:
        denoiser = getattr(pipe, family.denoiser)
        config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        super().__init__(denoiser, config, name)
        self.pipe = pipe
        self.family = family
        self.scheduler_class = type(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, per side."""
        return int(self.pipe.vae_scale_factor)

    def image_size(self) -> tuple[int, int]:
        """Returns the default image (height, width) in pixels, as the pipeline's default."""
        height, width = self.sample_size()
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Returns the latent (height, width) of an image size (ValueError: not a multiple of 8, too large)."""
        for side in (height, width):
            if side % 8 or side < 8:
                raise ValueError(f"image sides must be multiples of 8 (the pipeline's rule), got {width}x{height}")
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        self.size_of(GenerationRequest(size=size))  # the server's size limit
        return size

    def scheduler(self, name: str) -> Any:  # noqa: D102
        if name == OWN_SCHEDULER:
            return self.scheduler_class.from_config(self.scheduler_config)
        return make_scheduler(name, self.scheduler_config)

    def check_scheduler(self, name: str) -> None:  # noqa: D102
        if name != OWN_SCHEDULER and name not in available_schedulers():
            kinds = ", ".join([OWN_SCHEDULER, *available_schedulers()])
            raise ValueError(f"unknown scheduler {name!r}; valid: {kinds} ({OWN_SCHEDULER!r}: the folder's own)")
        self._check_schedule(name)

    def encode(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Returns each text's conditioning row(s), encoded in one call of the text encoder."""
        unique = list(dict.fromkeys(texts))
        with torch.no_grad():
            rows = self.family.encode(self.pipe, unique)
        where = {text: i for i, text in enumerate(unique)}
        return [{k: v[where[t] : where[t] + 1] for k, v in rows.items()} for t in texts]

    def decode(self, latents: list[torch.Tensor]) -> list[list[Any]]:
        """Returns the PIL images of each result's latents (all of one shape), decoded in one call."""
        counts = [x.shape[0] for x in latents]
        vae = self.pipe.vae
        with torch.no_grad():
            images = self.family.decode(self.pipe, torch.cat(latents).to(device=vae.device, dtype=vae.dtype))
        out, start = [], 0
        for n in counts:
            out.append(images[start : start + n])
            start += n
        return out


class TransformerPipelineServeModel(PipelineServeModel, TransformerServeModel):
    """A transformer pipeline (PixArt, SD3) served by prompt.

    ``PipelineServeModel``'s stages around a denoiser served as ``TransformerServeModel`` (its
    sample layout, sizes and shared inputs).
    """


def load_pipeline(folder: Path) -> PipelineServeModel:
    """Returns the pipeline in ``folder`` served by prompt (ValueError: ``prompt_servable`` says why not)."""
    ok, why = prompt_servable(folder)
    if not ok:
        raise ValueError(why)
    import diffusers

    name = pipeline_class_of(folder)
    family = _FAMILIES.get(name)
    index = json.loads((folder / "model_index.json").read_text())
    absent = dict.fromkeys(_saved_as_none(index))  # passed as None, as saved (SD3's T5)
    pipe = getattr(diffusers, name).from_pretrained(folder, **{**absent, **family.load_kwargs})
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    served = TransformerPipelineServeModel if family.denoiser == "transformer" else PipelineServeModel
    return served(pipe, family, name=str(folder))


def load_served(model: str) -> ServeModel:
    """Returns what ``dcfx serve --model`` serves: a pipeline by prompt, else ``load_serve_model(model)``.

    A pipeline folder of a family served by prompt (``prompt_servable``) is loaded whole; any
    other folder (or "digits") as its denoiser, with conditioning tensors in (a pipeline folder
    that is not served by prompt says why in the log).
    """
    path = Path(model)
    servable, why = prompt_servable(path)
    if servable:
        return load_pipeline(path)
    if pipeline_class_of(path) is not None:
        logger.warning("dcfx.serve: %s; serving its denoiser with conditioning tensors (POST /generate)", why)
    return load_serve_model(model)
