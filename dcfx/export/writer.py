"""Lowering a captured pair to a deployment format: the files, manifest.json, and a check.

``write_export`` takes what the caller resolved (the model, its spec, the config, the
dimension ranges and one call at the trace sizes): it exports the programs
(``dcfx.export.program``), has the format write its files, writes the manifest, loads the
files back and compares them with the in-process graphs. The public ``dcfx.export`` verb
(``dcfx.deploy``) and the ahead-of-time build cache (``dcfx.builds``) both call it; it knows
nothing of the runtime or the public API.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcfx.config import DeepCacheConfig
from dcfx.export.manifest import FORECAST, GraphEntry, Manifest, atomic_directory, config_sha256
from dcfx.export.program import ProgramPair, export_programs
from dcfx.export.registry import get_format
from dcfx.export.shapes import DimRange, dtype_name
from dcfx.models import BlockRange
from dcfx.passes import place_of
from dcfx.util import jsonable
from dcfx.version import __version__

logger = logging.getLogger(__name__)

# Attributes diffusers pipelines read off pipe.unet besides its config (SDXL's add_time_ids).
_ATTRIBUTES = ("add_embedding.linear_1.in_features",)
_STAGES = (
    "capture and cut",
    "export full graph",
    "export shallow graph",
    "export forecast graph",
    "write files",
    "check outputs",
    "hash files",
)


def write_export(
    model: nn.Module,
    spec: Any,
    cfg: DeepCacheConfig,
    out_dir: Path,
    format: str,  # noqa: A002  (the documented keyword)
    dims: Mapping[str, DimRange],
    call: dict[str, Any],
    *,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Writes the graphs of ``model`` cut at ``cfg.cut`` in ``format`` and manifest.json to ``out_dir``.

    ``model`` is at the graphs' dtype; ``call`` holds its keyword arguments at sizes inside
    ``dims`` (the trace sizes). The directory appears only once complete and checked.
    """
    fmt = get_format(format)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    bar = _progress(progress, f"dcfx export {format}")
    try:
        bar.set("capture and cut")
        programs = export_programs(model, cfg.cut, dict(dims), call, on_stage=bar.set)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            bar.set("write files")
            format_data = fmt.write(programs, tmp, **dict(options or {}))
            manifest = _manifest(format, model, spec, cfg, dtype, programs, format_data)
            bar.set("check outputs")
            manifest.checks = _check(fmt, tmp, manifest, programs, device)
            bar.set("hash files")
            manifest.write(tmp)
        bar.done()
    finally:
        bar.close()
    logger.info("dcfx: exported %s to %s (%s)", format, out_dir, manifest.checks)
    return out_dir


def _manifest(
    format: str,  # noqa: A002
    unet: nn.Module,
    spec: Any,
    cfg: DeepCacheConfig,
    dtype: torch.dtype,
    programs: ProgramPair,
    format_data: dict[str, Any],
) -> Manifest:
    versions = {"dcfx": __version__, "torch": torch.__version__}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    config = jsonable(spec.model_config(unet))
    model = {
        **spec.describe(unet),
        "config": config,
        "config_sha256": config_sha256(config),
        **_cut(unet, cfg),
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


def _cut(model: nn.Module, cfg: DeepCacheConfig) -> dict[str, Any]:
    # What the shallow graph leaves out. A U-Net: the up layer whose input is cached. A
    # transformer: the blocks whose residual is cached (cache-dit's F/B name, and the paths).
    place = place_of(model, cfg.cut)
    if isinstance(place, BlockRange):
        return {"cut": place.name, "cached_blocks": place.deep_paths()}
    return {"branch_layer": place.path}


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
