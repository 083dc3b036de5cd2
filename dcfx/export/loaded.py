"""What ``dcfx.load`` runs: a graph pair over exported files, and a stand-in for the model.

A loaded export has no model object and needs no diffusers code: ``ExportedModel`` answers
what a pipeline asks of ``pipe.unet`` (``config``, ``dtype``, ``device`` and a few recorded
attributes) from the manifest, and ``ExportedPair`` sizes every output from the manifest's
shape expressions, so a format's runtime can bind preallocated buffers (the forecast graph's
two feature inputs are the runtime's two feature buffers, bound where they lie).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from dcfx.adapters import SCALE_INPUT
from dcfx.backends import BufferFn, CompiledPair
from dcfx.export.manifest import FORECAST, ArtifactError, Manifest
from dcfx.export.shapes import TensorSpec, bind_inputs, dtype_from_name, evaluate


class ConfigDict(dict):
    """A read-only dict whose keys are also attributes (what diffusers' FrozenDict offers)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("an exported U-Net's config is read-only")

    __setitem__ = __delitem__ = __setattr__ = update = pop = setdefault = _readonly  # type: ignore[assignment]


def model_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Returns the stored config as diffusers' FrozenDict when diffusers is installed."""
    try:
        from diffusers.configuration_utils import FrozenDict
    except ImportError:
        return ConfigDict(config)
    return FrozenDict(config)


class ExportedModel(nn.Module):
    """Stands in for the exported U-Net: its config, dtype, device and recorded attributes.

    It has no weights and runs nothing itself (the ``DeepCacheUNet`` around it runs the
    graphs); ``attributes`` holds dotted paths a pipeline reads, such as SDXL's
    ``add_embedding.linear_1.in_features``.
    """

    def __init__(self, manifest: Manifest, device: torch.device) -> None:
        super().__init__()
        self.config = model_config(manifest.model["config"])
        self._dtype = dtype_from_name(manifest.dtype)
        self._device = torch.device(device)
        for path, value in manifest.model.get("attributes", {}).items():
            head, *rest = path.split(".")
            if not rest or not all(p.isidentifier() for p in (head, *rest)) or head in ("config", "forward"):
                raise ArtifactError(f"manifest attribute {path!r} is not a dotted attribute path")
            node = self.__dict__.setdefault(head, SimpleNamespace())
            for part in rest[:-1]:
                node = node.__dict__.setdefault(part, SimpleNamespace())
            setattr(node, rest[-1], value)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the graphs were exported in."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device the graphs run on."""
        return self._device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Refuses: an exported model runs through ``dcfx.load``'s runtime only."""
        raise RuntimeError("an exported model has no eager forward; call the module dcfx.load returned")

    def cache_context(self, name: str, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
        """Returns a context that does nothing: an export has none of diffusers' cache hooks.

        Pipelines of diffusion transformers (Flux) enter ``transformer.cache_context("cond")``
        around each call, for the hooks of diffusers' own caching methods; Wan's pass the step
        (``step_index``, ``sigma``, ``num_inference_steps``) too.
        """
        return contextlib.nullcontext()

    # To diffusers it is a model (ModelMixin, where diffusers is installed): a pipeline that
    # holds it and is saved calls save_pretrained, which refuses, rather than dropping the
    # U-Net from the saved pipeline with a warning.
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        try:
            from diffusers import ModelMixin
        except ImportError:
            return ExportedModel
        return ModelMixin

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refuses: an export holds compiled graphs, not weights diffusers can load."""
        raise TypeError(
            "this U-Net was loaded from a dcfx export (dcfx.load): it holds compiled graphs, not a model diffusers "
            "can save or load. Save the pipeline with its original U-Net (pipe.unet = the diffusers model) and keep "
            "the export directory beside it"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a U-Net loaded from an export cannot be pickled or deep-copied: its graphs live in runtime sessions; "
            "pickle the directory path and dcfx.load it again"
        )


class ExportedPair(CompiledPair):
    """The base of every format's loaded pair: input checks and output sizes from the manifest.

    A format implements ``_open(graph)``: load graph "full", "shallow" or "forecast" from its
    file (its constructor opens the first two; ``open_forecast`` the third, when the runtime
    forecasts), and ``_run(graph, inputs, outputs)``: run an opened graph on ``inputs``,
    writing into the preallocated ``outputs`` (IO binding).

    A call of a larger batch than the export's range runs in chunks within it (rows are
    independent in a U-Net), each writing its rows of the outputs in place: a batch range is
    the size engines are built for, not a limit on calls. (diffusers U-Nets branch at a batch
    of 64, in ``Upsample2D``: one graph cannot cover batches on both sides of it.)
    """

    def __init__(self, manifest: Manifest, device: torch.device) -> None:
        super().__init__(full=self._call_full, shallow=self._call_shallow)
        object.__setattr__(self, "manifest", manifest)
        object.__setattr__(self, "device", torch.device(device))
        full = manifest.graphs["full"]
        # Where each named dimension can be read off the inputs (the sample's axes).
        locate: dict[str, tuple[int, int]] = {}
        for i, spec in enumerate(full.inputs):
            for axis, expr in enumerate(spec.shape):
                if isinstance(expr, str) and expr in manifest.dims:
                    locate.setdefault(expr, (i, axis))
        object.__setattr__(self, "_locate", locate)

    @property
    def has_forecast(self) -> bool:
        """Whether the export holds the forecast graph (exports of older dcfx versions do not)."""
        return FORECAST in self.manifest.graphs

    def open_forecast(self) -> None:
        """Opens the forecast graph (once): ``run_forecast`` works from then on.

        The graph is opened only for a runtime that forecasts: an onnxruntime session, a
        TensorRT engine or an AOTInductor package keeps its own copy of the weights it uses.

        Raises:
            ArtifactError: the export holds no forecast graph, or its file cannot be opened.
        """
        if self.forecast is not None:
            return
        if not self.has_forecast:
            raise ArtifactError(
                f"this export holds the graphs {sorted(self.manifest.graphs)}, not the forecast graph that "
                f"forecast='linear' runs (it was written by dcfx {self.manifest.versions.get('dcfx', '?')}); "
                f"export again with this dcfx, or load it with forecast='none'"
            )
        self._open(FORECAST)
        object.__setattr__(self, "forecast", self._call_forecast)

    def check(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        """Checks a call's flat inputs against the export (once per input signature).

        Raises:
            ValueError: for inputs the export does not take (names, dtypes, sizes, device).
        """
        specs = self.manifest.graphs["full"].inputs
        expected = [s.name for s in specs]
        if SCALE_INPUT in names and SCALE_INPUT not in expected:
            raise TypeError(
                "this export takes no LoRA scale (cross_attention_kwargs={'scale': ...}): its LoRA state is baked in. "
                "Export with a call that passes the scale (example=...) to make it an input"
            )
        if list(names) != expected:
            raise ValueError(
                f"this export takes the inputs {expected}, the call gave {list(names)}: call the U-Net with the "
                f"arguments it was exported with"
            )
        for name, tensor in zip(names, tensors, strict=True):
            if tensor.device != self.device:
                raise ValueError(
                    f"input {name!r} is on {tensor.device}; this export runs on {self.device} (dcfx.load(device=...))"
                )
        chunks = self._chunks(tensors)
        bind_inputs(specs, self._slice("full", tensors, chunks[0]) if chunks else tensors, self.manifest.dims)

    def _chunks(self, inputs: Sequence[torch.Tensor]) -> list[slice] | None:
        """Returns the row ranges a call of a batch above the export's range runs in (None: it runs whole).

        Raises:
            ValueError: the batch cannot be split into chunks the range holds.
        """
        where, dim = self._locate.get("batch"), self.manifest.dims.get("batch")
        if where is None or dim is None:
            return None
        batch = inputs[where[0]].shape[where[1]]
        if batch <= dim.max:
            return None
        count = -(-batch // dim.max)
        sizes = [batch // count + (i < batch % count) for i in range(count)]
        if sizes[-1] < dim.min:
            raise ValueError(
                f"a batch of {batch} does not split into chunks of the exported range {dim.describe()}; "
                f"export again with shapes={{'batch': (min, max)}} covering it"
            )
        starts = [sum(sizes[:i]) for i in range(count)]
        return [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]

    def _slice(
        self, graph: str, tensors: Sequence[torch.Tensor], rows: slice, outputs: bool = False
    ) -> list[torch.Tensor]:
        """Returns ``rows`` of each of ``graph``'s inputs (or outputs) that has the batch dimension first."""
        entry = self.manifest.graphs[graph]
        specs = entry.outputs if outputs else entry.inputs
        return [t[rows] if spec.shape[:1] == ("batch",) else t for spec, t in zip(specs, tensors, strict=True)]

    def _run_rows(self, graph: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        """Runs ``graph`` on ``inputs`` into ``outputs``, in chunks of rows where the batch exceeds the range."""
        chunks = self._chunks(inputs)
        if chunks is None:
            self._run(graph, inputs, outputs)
            return
        for rows in chunks:
            self._run(graph, self._slice(graph, inputs, rows), self._slice(graph, outputs, rows, outputs=True))

    def sizes(self, inputs: Sequence[torch.Tensor]) -> tuple[tuple[int, int], ...]:
        """Returns the named dimensions' values in a call (sorted (name, value) pairs)."""
        return tuple(sorted((name, inputs[i].shape[axis]) for name, (i, axis) in self._locate.items()))

    def run_full(  # noqa: D102
        self, inputs: tuple[torch.Tensor, ...], buffer_for: BufferFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = _contiguous(inputs)
        sample_spec, feature_spec = self.manifest.graphs["full"].outputs
        values = self.sizes(inputs)
        sample = self._empty(sample_spec, values)
        shape = torch.Size(_size(feature_spec, values))
        feature = buffer_for(shape, _contiguous_strides(shape), feature_spec.torch_dtype, self.device)
        self._run_rows("full", inputs, (sample, feature))
        return sample, feature

    def run_shallow(self, inputs: tuple[torch.Tensor, ...], feature: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._run_sample("shallow", inputs, (feature,))

    def _run_sample(
        self, graph: str, inputs: tuple[torch.Tensor, ...], features: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # The features are the runtime's buffers (written by run_full, contiguous): bound in place.
        (spec,) = self.manifest.graphs[graph].outputs
        inputs = _contiguous(inputs)
        sample = self._empty(spec, self.sizes(inputs))
        self._run_rows(graph, (*inputs, *features), (sample,))
        return sample

    def run_forecast(  # noqa: D102
        self,
        inputs: tuple[torch.Tensor, ...],
        feature: torch.Tensor,
        previous: torch.Tensor,
        coefficient: torch.Tensor,
    ) -> torch.Tensor:
        if self.forecast is None:
            raise RuntimeError("the forecast graph of this export is not open (ExportedPair.open_forecast)")
        return self._run_sample(FORECAST, inputs, (feature, previous, coefficient))

    def _call_full(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = _contiguous(inputs)
        sample_spec, feature_spec = self.manifest.graphs["full"].outputs
        values = self.sizes(inputs)
        outputs = (self._empty(sample_spec, values), self._empty(feature_spec, values))
        self._run_rows("full", inputs, outputs)
        return outputs

    def _call_shallow(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run_shallow(inputs[:-1], inputs[-1])

    def _call_forecast(self, *inputs: torch.Tensor) -> torch.Tensor:
        *call, feature, previous, coefficient = _contiguous(inputs)
        return self.run_forecast(tuple(call), feature, previous, coefficient)

    def _empty(self, spec: TensorSpec, values: tuple[tuple[str, int], ...]) -> torch.Tensor:
        return torch.empty(_size(spec, values), dtype=spec.torch_dtype, device=self.device)

    def _open(self, graph: str) -> None:
        raise NotImplementedError

    def _run(self, graph: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError


def _contiguous(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # Every format reads its inputs as dense row-major memory (an expanded timestep has stride 0).
    return tuple(t.contiguous() for t in tensors)


@functools.lru_cache(maxsize=256)
def _size(spec: TensorSpec, values: tuple[tuple[str, int], ...]) -> tuple[int, ...]:
    named = dict(values)
    return tuple(evaluate(d, named) for d in spec.shape)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
