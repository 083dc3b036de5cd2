"""Deployment: the graph pair written as ONNX, TensorRT engines or AOTInductor packages.

``export`` captures the U-Net over ranges of batch, height and width, cuts it, writes the full
and shallow graphs and the forecast graph (the shallow graph on a forecast of the feature,
for ``forecast="linear"``) in a format plus manifest.json, and checks the written graphs
against the in-process ones. ``load`` verifies a directory and returns the same runtime as
``dcfx.compile`` over the exported graphs, without the model object and without diffusers'
model code.
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
from dcfx.export.loaded import ExportedModel, ExportedPair
from dcfx.export.manifest import (
    FORECAST,
    ArtifactError,
    GraphEntry,
    Manifest,
    atomic_directory,
    config_sha256,
    read_manifest,
)
from dcfx.export.program import ProgramPair, export_programs, trace_size
from dcfx.export.registry import available_formats, check_format_options, get_format, register_format
from dcfx.export.shapes import dtype_name, parse_dims
from dcfx.models import StoredSpec
from dcfx.runtime import DeepCacheUNet

__all__ = ["ArtifactError", "available_formats", "export", "load", "register_format"]

logger = logging.getLogger(__name__)

# Attributes diffusers pipelines read off pipe.unet besides its config (SDXL's add_time_ids).
_ATTRIBUTES = ("add_embedding.linear_1.in_features",)
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DeepCacheConfig))
_STAGES = (
    "capture and cut",
    "export full graph",
    "export shallow graph",
    "export forecast graph",
    "write files",
    "check outputs",
    "hash files",
)


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
    from dcfx.api import check_branch, model_spec, split_config_fields

    spec = model_spec(unet)
    if len(spec.sample_dims) != 4:
        raise TypeError(
            f"dcfx.export takes image U-Nets (4-d samples); {type(unet).__name__} takes "
            f"({', '.join(spec.sample_dims)}). Use dcfx.compile for it (eager or inductor)."
        )
    cfg, options = split_config_fields(config, kwargs)
    check_branch(unet, spec, cfg)
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
    bar = _progress(progress, f"dcfx export {format}")
    try:
        bar.set("capture and cut")
        programs = export_programs(model, cfg.branch, dims, call, on_stage=bar.set)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            bar.set("write files")
            format_data = fmt.write(programs, tmp, **options)
            manifest = _manifest(format, unet, spec, cfg, dtype, programs, format_data)
            bar.set("check outputs")
            manifest.checks = _check(fmt, tmp, manifest, programs, device)
            bar.set("hash files")
            manifest.write(tmp)
        bar.done()
    finally:
        bar.close()
    logger.info("dcfx: exported %s to %s (%s)", format, out_dir, manifest.checks)
    return out_dir


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


def _manifest(
    format: str,  # noqa: A002
    unet: nn.Module,
    spec: Any,
    cfg: DeepCacheConfig,
    dtype: torch.dtype,
    programs: ProgramPair,
    format_data: dict[str, Any],
) -> Manifest:
    import dcfx

    versions = {"dcfx": dcfx.__version__, "torch": torch.__version__}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    config = _jsonable(spec.model_config(unet))
    model = {
        **spec.describe(unet),
        "config": config,
        "config_sha256": config_sha256(config),
        "branch_layer": spec.up_layers(unet)[cfg.branch].path,  # the up layer whose input is cached
        "shallow_layers": programs.graphs.kept_layers,
        "attributes": {path: v for path in _ATTRIBUTES if (v := _attribute(unet, path)) is not None},
    }
    files = format_data.pop("files")
    # A format registered elsewhere may write no forecast graph: its exports cannot forecast.
    graphs = {
        graph: GraphEntry(files[graph], inputs, outputs)
        for graph, (_, inputs, outputs) in programs.programs().items()
        if graph in files
    }
    return Manifest(
        format=format,
        versions=versions,
        model=model,
        deepcache=cfg.to_dict(),
        dtype=dtype_name(dtype),
        dims=programs.dims,
        graphs=graphs,
        format_data=format_data,
    )


def _check(
    fmt: Any, directory: Path, manifest: Manifest, programs: ProgramPair, device: torch.device
) -> dict[str, Any]:
    # The written graphs, loaded back, against the in-process graphs at the trace sizes.
    run_on = torch.device(manifest.format_data.get("device", device))
    pair = fmt.load(directory, manifest, device=run_on)
    example = programs.example
    on_device = tuple(t.to(run_on) for t in example)
    with torch.no_grad():
        want_sample, want_feature = programs.graphs.full(*example)
        want_shallow = programs.graphs.shallow(*example, want_feature)
        got_sample, got_feature = (t.to(device) for t in pair.full(*on_device))
        got_shallow = pair.shallow(*on_device, want_feature.to(run_on)).to(device)
    diffs = {
        "full_max_abs_diff": _max_abs_diff(got_sample, want_sample),
        "feature_max_abs_diff": _max_abs_diff(got_feature, want_feature),
        "shallow_max_abs_diff": _max_abs_diff(got_shallow, want_shallow),
    }
    if FORECAST in manifest.graphs:
        # Another feature as the previous one, and a coefficient that moves the feature.
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(want_feature.shape, generator=g).to(want_feature)
        previous = want_feature + 0.1 * noise * want_feature.abs().max()
        coefficient = torch.tensor(0.5, dtype=torch.float32, device=want_feature.device)
        pair.open_forecast()
        with torch.no_grad():
            want_forecast = programs.forecast_graph(*example, want_feature, previous, coefficient)
            moved = (want_feature.to(run_on), previous.to(run_on), coefficient.to(run_on))
            got_forecast = pair.forecast(*on_device, *moved).to(device)
        diffs["forecast_max_abs_diff"] = _max_abs_diff(got_forecast, want_forecast)
        # How far the forecast moved the output: a check that could not tell a forecast from
        # the shallow graph would be vacuous.
        diffs["forecast_moved_max_abs"] = _max_abs_diff(want_forecast, want_shallow)
    return {"at": {s.name: list(t.shape) for s, t in zip(programs.inputs, example, strict=True)}, **diffs}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _attribute(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, (int, float, str, bool)) else None


class _progress:
    """Stage-by-stage progress on stderr (tqdm), or nothing."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(_STAGES), desc=desc, unit="stage", leave=True)
        self._seen: set[str] = set()

    def set(self, stage: str) -> None:
        if self._bar is not None and stage not in self._seen:
            if self._seen:
                self._bar.update(1)
            self._seen.add(stage)
            self._bar.set_postfix_str(stage)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.update(self._bar.total - self._bar.n)
            self._bar.set_postfix_str("done")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


from dcfx.export import aoti, onnx, tensorrt  # noqa: E402,F401  (registration)
