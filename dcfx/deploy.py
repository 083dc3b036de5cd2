"""The deployment verbs: ``dcfx.export`` writes the graph pair in a format, ``dcfx.load`` runs it.

``export`` captures the model (a U-Net, or a diffusion transformer) over ranges of batch,
height, width, prompt length and (a video transformer's) latent frames, cuts it, writes the
full and shallow graphs and the forecast graph (the shallow graph on a forecast of the feature,
for ``forecast="linear"``) in a format plus manifest.json, and checks the written graphs
against the in-process ones (``dcfx.export.writer``). ``load`` verifies a directory and returns
the same runtime as ``dcfx.compile`` over the exported graphs, without the model object and
without diffusers' model code.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcfx.config import DeepCacheConfig
from dcfx.export.axes import (
    call_sizes,
    frame_multiple,
    model_dims,
    sample_frames,
    spatial_multiple,
    trace_call,
    trace_sizes,
)
from dcfx.export.loaded import ExportedModel, ExportedPair
from dcfx.export.manifest import FORECAST, ArtifactError, read_manifest
from dcfx.export.registry import check_format_options, get_format
from dcfx.export.shapes import IMAGE_TOKENS, TRANSFORMER_TOKENS, parse_dims
from dcfx.export.writer import write_export
from dcfx.models import StoredSpec, TransformerSpec, unflatten
from dcfx.resolve import check_branch, model_spec, split_config_fields
from dcfx.runtime import DeepCacheUNet

logger = logging.getLogger(__name__)

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DeepCacheConfig))


def export(
    unet: nn.Module,
    out_dir: str | os.PathLike[str],
    config: DeepCacheConfig | str | os.PathLike[str] | None = None,
    *,
    format: str = "onnx",  # noqa: A002  (the documented keyword)
    shapes: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    example: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> Path:
    """Writes the full, shallow and forecast graphs of ``unet`` in ``format`` and manifest.json to ``out_dir``.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` or ``UNet2DModel``, a latent-diffusion
            ``UNetModel``, or an image diffusion transformer (SD3, Flux, PixArt, DiT); left
            unchanged.
        out_dir: The export directory; it appears only once complete.
        config: A ``DeepCacheConfig``, the path of its JSON, or None with its fields as keywords.
            Only the cut (``branch``; a transformer's ``first`` and ``last``) shapes the graphs;
            the schedule and the forecast mode are recorded
            as ``load``'s defaults (every export carries the forecast graph, whatever the mode).
        format: ``"onnx"``, ``"tensorrt"`` or ``"aoti"`` (``dcfx.export.available_formats()``).
        shapes: ``{"batch": ..., "height": ..., "width": ..., "tokens": ...}``, heights and widths in
            latent pixels, tokens the prompt length (the cross-attention states' second dimension;
            long prompts come as 77 x k), and for a video transformer (Wan) ``"frames"``, latent
            frames (default: the example's, static; 1 without one): an int (static), ``(min, max)``
            or ``(min, opt, max)``. Defaults: batch (1, 2, 4), height and width from half to twice
            ``unet.config.sample_size`` (a ``UNetModel``'s ``image_size``), tokens the example's
            (77 for the built-in example; static). A transformer's heights and widths are multiples
            of its patch size (Flux's: of 2, carried as ``image_tokens``, the count of 2x2 latent
            patches); its tokens default to (2, 77, 512) without ``example``. A model that derives
            output sizes from what the trace fixes (DiT: square latents) is refused a range of them
            by name.
        dtype: The graphs' dtype (default: the model's); a copy of the model is cast.
        example: Keyword arguments of one model call at sizes inside the ranges, for inputs the
            built-in example lacks (ControlNet residuals) or sizes it guesses; default: a typical
            call. It is resized (new values) where dynamic dimensions meet at one size or at the
            model's own size (``trace_sizes``).
        overwrite: Replace an existing ``out_dir`` (once the new export is complete).
        progress: Show a progress bar on stderr.
        **kwargs: DeepCacheConfig fields, then format options (onnx: ``opset``; tensorrt:
            ``precision``, ``timing_cache``, ``workspace``; aoti: ``inductor_configs``).

    Returns:
        The export directory.

    Raises:
        TypeError: unsupported model (video U-Nets are not exported),
            unknown option, config and fields both given.
        ValueError: bad cut, shapes or format; ranges the model cannot be traced over.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ImportError: the format's packages are missing (checked before any work).
    """
    spec = model_spec(unet)
    if "frames" in spec.sample_dims and not isinstance(spec, TransformerSpec):
        raise TypeError(
            f"dcfx.export takes image U-Nets and transformers; {type(unet).__name__} is a video U-Net taking "
            f"({', '.join(spec.sample_dims)}). Use dcfx.compile for it (eager or inductor)."
        )
    cfg, options = split_config_fields(config, kwargs)
    cfg = check_branch(unet, spec, cfg)
    fmt = get_format(format)
    check_format_options(format, options)
    fmt.check_available()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (or --overwrite) to replace it")
    device = next(unet.parameters()).device
    model_dtype = next(unet.parameters()).dtype
    dtype = dtype or model_dtype
    multiple = spatial_multiple(unet)
    model = unet if dtype == model_dtype else spec.cast(unet, dtype)
    if example is not None:
        sample = example.get(spec.sample_input)
        if not isinstance(sample, torch.Tensor) or sample.ndim != len(spec.sample_dims):
            raise ValueError(
                f"example must be the keyword arguments of a {type(unet).__name__} call, with a "
                f"{len(spec.sample_dims)}-d {spec.sample_input!r} tensor ({', '.join(spec.sample_dims)})"
            )
    typical = example or spec.example_call(model, spec.sample_shape(model, 1, 8, 8), dtype, device)
    context = typical.get(spec.context_input)
    tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim == 3 else None
    (names, tensors), _ = spec.flatten(model, (), dict(typical))
    frames = sample_frames(model, names, tensors)
    shapes = dict(shapes or {})
    if isinstance(spec, TransformerSpec) and example is None and tokens is not None:
        shapes.setdefault("tokens", TRANSFORMER_TOKENS)  # the built-in example's length means nothing
    size = spec.default_size(unet)
    dims = parse_dims(shapes, size, multiple, tokens=tokens, frames=frames, frame_multiple=frame_multiple(unet))
    dims = model_dims(model, dims)
    call = _traced_call(model, spec, dims, example, dtype, device)
    return write_export(
        model, spec, cfg, out_dir, format, dims, call, options=options, overwrite=overwrite, progress=progress
    )


def _traced_call(
    model: nn.Module,
    spec: Any,
    dims: Mapping[str, Any],
    example: Mapping[str, Any] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """Returns the call an export is traced with: the example (or a typical call) at the trace sizes.

    The sizes are the example's where they do (``trace_sizes``: off 1 unit, dynamic dimensions
    apart, away from the model's own size); else the example is resized along them.

    Raises:
        ValueError: an example outside the ranges.
    """
    given = example is not None
    if example is None:
        configured = spec.default_size(model)
        size = trace_sizes(dims, avoid={"height": configured, "width": configured})
        # A packed sample's image tokens as one row of 2x2 patches: any shape of that count will do.
        side = {"height": 2, "width": 2 * size[IMAGE_TOKENS]} if IMAGE_TOKENS in size else size
        shape = spec.sample_shape(model, size["batch"], side["height"], side["width"])
        example = spec.example_call(model, shape, dtype, device)
    (names, tensors), _ = spec.flatten(model, (), dict(example))
    sizes = call_sizes(model, names, tensors)
    for name, dim in dims.items():
        if given and name in sizes and not dim.contains(sizes[name]):
            if name == IMAGE_TOKENS:
                raise ValueError(
                    f"the example's {sizes[name]} image tokens are outside {dim.describe()}, the counts of "
                    f"shapes['height'] x shapes['width'] in 2x2 latent patches; give an example inside the ranges"
                )
            raise ValueError(
                f"the example's {name} {sizes[name]} is outside shapes[{name!r}] ({dim.describe()}); "
                f"give an example at sizes inside the ranges (ideally the opt sizes)"
            )
    traced = trace_call(model, names, tensors, dims, start=sizes)
    if all(a is b for a, b in zip(traced, tensors, strict=True)):
        return dict(example)
    return unflatten(names, traced)


def load(
    directory: str | os.PathLike[str],
    *,
    scheduler: Any = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> DeepCacheUNet:
    """Returns the runtime of ``dcfx.compile`` running the graphs exported to ``directory``.

    Every file is checked against the manifest's sha256 before anything is loaded; nothing is
    unpickled. The model's config comes from the manifest, so ``pipe.unet = dcfx.load(dir)``
    works in a pipeline built without the U-Net's weights.

    Args:
        directory: An export directory (``dcfx.export``).
        scheduler: The pipeline's scheduler (as in ``dcfx.compile``).
        device: Where the graphs run: "cpu" (onnx, aoti) or "cuda" (all formats). Default:
            the device the format exported for.
        **kwargs: DeepCacheConfig fields to change the schedule (``interval``, ``schedule``,
            ``forecast``, ...; not another ``branch``, ``first`` or ``last``: the graphs are cut
            once), then the
            format's load options (onnx: ``providers``, ``session_options``; tensorrt:
            ``cuda_graph``). The forecast graph is opened only with ``forecast="linear"``.

    Raises:
        ArtifactError: a missing or altered file, a newer format version, an engine built for
            another GPU or TensorRT version, forecasting asked of an export without the
            forecast graph (written before dcfx exported it).
        ValueError: a cut other than the exported one (a branch, first or last), named.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    fmt = get_format(manifest.format)
    stored = DeepCacheConfig.from_dict(manifest.deepcache)
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    _check_cut(directory, stored, fields)
    base = stored.to_dict()
    if fields.get("schedule", stored.schedule) != stored.schedule:
        # Another schedule: the stored one's own fields (center, start, ...) do not carry over.
        base = {k: base[k] for k in ("branch", "first", "last", "interval", "forecast") if k in base}
    cfg = DeepCacheConfig.from_dict({**base, **fields})
    if cfg.schedule_spec.needs_step_count() and scheduler is None:
        raise ValueError(f"the {cfg.schedule} schedule needs the step count: pass scheduler=pipe.scheduler or steps=")
    if cfg.forecast_spec.forecasts and FORECAST not in manifest.graphs:
        raise ArtifactError(
            f"{directory} holds the graphs {sorted(manifest.graphs)} but no forecast graph (written by dcfx "
            f"{manifest.versions.get('dcfx', '?')}), so it cannot run forecast={cfg.forecast!r}: export it again "
            f"with this dcfx, or load it with forecast='none'"
        )
    device = torch.device(device or manifest.format_data.get("device", "cpu"))
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    valid = [p for p in inspect.signature(fmt.load).parameters if p not in ("directory", "manifest", "device")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(
            f"dcfx.load got unknown option(s) {unknown}; it takes DeepCacheConfig fields (not branch) and, for "
            f"{manifest.format}: {', '.join(valid) or 'none'}"
        )
    try:
        model = ExportedModel(manifest, device)
        spec = StoredSpec.from_description(ExportedModel, manifest.model)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory / 'manifest.json'}: malformed model entry: {e!r}") from e
    pair: ExportedPair = fmt.load(directory, manifest, device=device, **kwargs)
    if cfg.forecast_spec.forecasts:
        pair.open_forecast()  # now, not at the first step: a bad file is refused at load
    return DeepCacheUNet(model, cfg, spec, _LoadedBuild(pair, str(directory)), scheduler=scheduler)


def _check_cut(directory: Path, stored: DeepCacheConfig, fields: Mapping[str, Any]) -> None:
    """Raises ValueError for ``load`` fields that name another cut than the exported one (the graphs hold one)."""
    given = {k: fields[k] for k in ("branch", "first", "last") if fields.get(k) is not None}
    if stored.blocks is None:
        if "first" in given or "last" in given:
            raise ValueError(
                f"{directory} holds a U-Net's graphs cut at branch {stored.branch}; first= and last= cut a diffusion "
                f"transformer's blocks: leave them out"
            )
        if given.get("branch", stored.branch) != stored.branch:
            raise ValueError(
                f"{directory} holds the graphs of branch {stored.branch}; export again for branch {given['branch']}"
            )
        return
    first, last = stored.blocks
    held = f"the graphs of the block range F{first}B{last} (first={first}, last={last})"
    if "branch" in given:
        raise ValueError(
            f"{directory} holds a diffusion transformer's graphs, {held}; branch= cuts a U-Net: leave it out"
        )
    for name, value in (("first", first), ("last", last)):
        if given.get(name, value) != value:
            raise ValueError(
                f"{directory} holds {held}; {name}={given[name]} asks for another cut: export again with "
                f"first={given.get('first', first)}, last={given.get('last', last)}"
            )


class _LoadedBuild:
    """Hands the runtime the loaded pair for every input signature, after checking the inputs."""

    def __init__(self, pair: ExportedPair, directory: str) -> None:
        self.pair = pair
        self.directory = directory

    def bucket(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """One loaded pair serves every input signature: no bucket."""
        return None

    def __call__(
        self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool = False
    ) -> ExportedPair:
        """Returns the loaded pair for the call, its forecast graph opened when ``forecast``.

        Raises:
            ValueError: inputs the export does not take.
            ArtifactError: ``forecast`` for an export without the forecast graph.
        """
        self.pair.check(names, tensors)
        if forecast:
            self.pair.open_forecast()
        return self.pair

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a U-Net loaded from an export ({self.directory}) cannot be pickled or deep-copied: its "
            f"graphs live in runtime sessions; pickle the directory path and dcfx.load it again"
        )
