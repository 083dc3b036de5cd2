"""The deployment verbs: ``dcfx.export`` writes the graph pair in a format, ``dcfx.load`` runs it.

``export`` captures the U-Net over ranges of batch, height and width, cuts it, writes the full
and shallow graphs and the forecast graph (the shallow graph on a forecast of the feature,
for ``forecast="linear"``) in a format plus manifest.json, and checks the written graphs
against the in-process ones (``dcfx.export.writer``). ``load`` verifies a directory and
returns the same runtime as ``dcfx.compile`` over the exported graphs, without the model
object and without diffusers' model code.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcfx.config import DeepCacheConfig
from dcfx.export.loaded import ExportedModel, ExportedPair
from dcfx.export.manifest import FORECAST, ArtifactError, read_manifest
from dcfx.export.program import trace_size
from dcfx.export.registry import check_format_options, get_format
from dcfx.export.shapes import parse_dims
from dcfx.export.writer import write_export
from dcfx.models import StoredSpec
from dcfx.resolve import check_branch, model_spec, split_config_fields
from dcfx.runtime import DeepCacheUNet

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
        unet: A diffusers ``UNet2DConditionModel`` or ``UNet2DModel``, or a latent-diffusion
            ``UNetModel`` (left unchanged).
        out_dir: The export directory; it appears only once complete.
        config: A ``DeepCacheConfig``, the path of its JSON, or None with its fields as keywords.
            Only the branch shapes the graphs; the schedule and the forecast mode are recorded
            as ``load``'s defaults (every export carries the forecast graph, whatever the mode).
        format: ``"onnx"``, ``"tensorrt"`` or ``"aoti"`` (``dcfx.export.available_formats()``).
        shapes: ``{"batch": ..., "height": ..., "width": ..., "tokens": ...}``, heights and
            widths in latent pixels, tokens the prompt length (the cross-attention states' second
            dimension; long prompts come as 77 x k): an int (static), ``(min, max)`` or
            ``(min, opt, max)``. Defaults: batch (1, 2, 4), height and width from half to twice
            ``unet.config.sample_size`` (a ``UNetModel``'s ``image_size``), tokens the
            example's (77 for the built-in example; static).
        dtype: The graphs' dtype (default: the model's); a copy of the model is cast.
        example: Keyword arguments of one U-Net call at the ``opt`` sizes, for inputs the
            built-in example lacks (ControlNet residuals) or sizes it guesses (a context of
            other than 77 tokens); default: a typical call.
        overwrite: Replace an existing ``out_dir`` (once the new export is complete).
        progress: Show a progress bar on stderr.
        **kwargs: DeepCacheConfig fields, then format options (onnx: ``opset``; tensorrt:
            ``precision``, ``timing_cache``, ``workspace``; aoti: ``inductor_configs``).

    Returns:
        The export directory.

    Raises:
        TypeError: unsupported model (video U-Nets are not exported), unknown option, config
            and fields both given.
        ValueError: bad branch, shapes or format.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ImportError: the format's packages are missing (checked before any work).
    """
    spec = model_spec(unet)
    if len(spec.sample_dims) != 4:
        raise TypeError(
            f"dcfx.export takes image U-Nets (4-d samples); {type(unet).__name__} takes "
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
    factor = spec.downsampling_factor(unet)
    model = unet if dtype == model_dtype else spec.cast(unet, dtype)
    if example is not None:
        sample = example.get(spec.sample_input)
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            raise ValueError(
                f"example must be the keyword arguments of a U-Net call, with a 4-d {spec.sample_input!r} tensor"
            )
    typical = (
        example if example is not None else spec.example_call(model, (1, spec.in_channels(unet), 8, 8), dtype, device)
    )
    context = typical.get(spec.context_input)
    tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim == 3 else None
    dims = parse_dims(shapes, spec.default_size(unet), factor, tokens=tokens)
    size = {name: trace_size(dim) for name, dim in dims.items()}
    if example is not None:
        sizes = {"batch": sample.shape[0], "height": sample.shape[2], "width": sample.shape[3], "tokens": tokens}
        for name, dim in dims.items():
            if not dim.contains(sizes[name]):
                raise ValueError(
                    f"the example's {name} {sizes[name]} is outside shapes[{name!r}] ({dim.describe()}); "
                    f"give an example at sizes inside the ranges (ideally the opt sizes)"
                )
        call = dict(example)
    else:
        call = spec.example_call(
            model, (size["batch"], spec.in_channels(unet), size["height"], size["width"]), dtype, device
        )
        if tokens is not None and size["tokens"] != tokens:
            states = call[spec.context_input]
            call[spec.context_input] = torch.randn(
                states.shape[0], size["tokens"], states.shape[2], dtype=states.dtype, device=states.device
            )
    return write_export(
        model, spec, cfg, out_dir, format, dims, call, options=options, overwrite=overwrite, progress=progress
    )


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
            ``forecast``, ...; not ``branch``: the graphs are cut for one branch), then the
            format's load options (onnx: ``providers``, ``session_options``; tensorrt:
            ``cuda_graph``). The forecast graph is opened only with ``forecast="linear"``.

    Raises:
        ArtifactError: a missing or altered file, a newer format version, an engine built for
            another GPU or TensorRT version, forecasting asked of an export without the
            forecast graph (written before dcfx exported it).
        ValueError: a branch other than the exported one.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    fmt = get_format(manifest.format)
    stored = DeepCacheConfig.from_dict(manifest.deepcache)
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    if "branch" in fields and fields["branch"] != stored.branch:
        raise ValueError(
            f"{directory} holds the graphs of branch {stored.branch}; export again for branch {fields['branch']}"
        )
    base = stored.to_dict()
    if fields.get("schedule", stored.schedule) != stored.schedule:
        # Another schedule: the stored one's own fields (center, start, ...) do not carry over.
        base = {k: base[k] for k in ("branch", "interval", "forecast") if k in base}
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
