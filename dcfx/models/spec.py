"""How dcfx calls and cuts one U-Net class: ``ModelSpec``, its up layers, and the stored spec.

A ``ModelSpec`` says how a call flattens into named tensors (and back), and which up layers
define the skip branches. A ``StoredSpec`` is one rebuilt from an export's manifest. Nothing
here knows FX.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcfx.adapters import lora_scaled
from dcfx.models.calls import CallBinder, output_maker

Flat = tuple[tuple[str, ...], tuple[torch.Tensor, ...]]
# ``ModelSpec.describe``'s output entry for a model whose forward returns the tensor itself.
TENSOR_OUTPUT = "tensor"


@dataclass(frozen=True)
class UpLayer:
    """One up layer (resnet, with its attention if any) and the skip branch that caches its input.

    ``block`` and ``layer`` index ``unet.up_blocks[block].resnets[layer]``; ``branch`` numbers
    the layers from the output end: branch 0 is the last layer of the last up block.
    """

    branch: int
    block: int
    layer: int

    @property
    def path(self) -> str:
        """The module path of the layer's resnet, e.g. ``up_blocks.3.resnets.2``."""
        return f"up_blocks.{self.block}.resnets.{self.layer}"

    def deep_paths(self) -> list[str]:
        """Returns the module paths a shallow step of this branch must not run.

        The mid block, the up blocks before this layer's, and the layers before it in its block.
        """
        paths = ["mid_block"] + [f"up_blocks.{i}" for i in range(self.block)]
        for i in range(self.layer):
            paths += [f"up_blocks.{self.block}.resnets.{i}", f"up_blocks.{self.block}.attentions.{i}"]
        return paths


@dataclass(frozen=True)
class ModelSpec:
    """How dcfx calls and cuts one U-Net class."""

    model_class: type[nn.Module]
    output_field: str = "sample"
    # The sample's dimensions: image U-Nets take (batch, channels, height, width); video U-Nets
    # (SVD) take (batch, frames, channels, height, width).
    sample_dims: tuple[str, ...] = ("batch", "channels", "height", "width")
    # The forward's names for the sample, the timestep and the cross-attention states: the
    # flat call keeps the model's own names, and the runtime reads the timestep by this one.
    sample_input: str = "sample"
    timestep_input: str = "timestep"
    context_input: str = "encoder_hidden_states"
    # How many parts of a module path name one layer inside a block list (kept_layers):
    # ``up_blocks.1.resnets.0`` is 4.
    layer_depth: int = 4
    # The forward returns the output tensor itself (no output class, no return_dict).
    returns_tensor: bool = False
    # What pipelines divide the scheduler's timesteps by before calling the model (Flux: 1000).
    timestep_divisor: float = 1.0

    def in_channels(self, model: nn.Module) -> int:
        """Returns the channel count of the model's sample."""
        return int(model.config.in_channels)

    def default_size(self, model: nn.Module) -> int:
        """Returns the latent height and width the model is configured for."""
        size = model.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """Returns the model's config as a dict (an export's manifest records and hashes it)."""
        return dict(model.config)

    def placement(self, model: nn.Module) -> tuple[torch.dtype, torch.device]:
        """Returns the dtype a sample must have and the device of the weights."""
        return model.dtype, model.device

    def context_width(self, model: nn.Module) -> int | None:
        """Returns the last dimension the cross-attention states must have (None: not checked)."""
        width = getattr(model.config, "encoder_hid_dim", None) or getattr(model.config, "cross_attention_dim", None)
        return width if isinstance(width, int) else None

    def downsampling_factor(self, model: nn.Module) -> int:
        """Returns how much the U-Net shrinks the sample: 2 ** (number of downsampling blocks)."""
        return 2 ** sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))

    def cast(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """Returns a copy of ``model`` that computes in ``dtype`` (``dcfx.export(dtype=...)``)."""
        return copy.deepcopy(model).to(dtype)

    def sample_shape(self, model: nn.Module, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Returns the sample shape of a call at ``batch``, ``height``, ``width``.

        A video U-Net's frame count comes from its config's ``num_frames``.
        """
        sizes = {"batch": batch, "channels": self.in_channels(model), "height": height, "width": width}
        if "frames" in self.sample_dims:
            sizes["frames"] = int(model.config.num_frames)
        return tuple(sizes[d] for d in self.sample_dims)

    def check_sample_shape(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        """Raises ValueError unless ``shape`` has this layout's rank and the model's channels."""
        channels = self.in_channels(model)
        at = self.sample_dims.index("channels")
        if len(shape) != len(self.sample_dims) or shape[at] != channels:
            want = ", ".join(str(channels) if d == "channels" else d for d in self.sample_dims)
            raise ValueError(f"sample shape must be ({want}) for {type(model).__name__}, got {tuple(shape)}")

    def check_inputs(self, model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """Raises for a call ``model`` cannot take, before any graph is built for it.

        Checks the sample's layout, channels, dtype and device against the model's, that
        every other input is on the sample's device with the sample's batch (or a batch of 1,
        which the model may broadcast), and the shape of the cross-attention states. Heights
        and widths need not be multiples of the model's downsampling factor: diffusers U-Nets
        take any size, and so does dcfx.

        Raises:
            TypeError: a sample that is not floating point, or not in the weights' dtype.
            ValueError: a wrong shape, batch or device, naming what the model takes.
        """
        name = self.sample_input
        sample = tensors[names.index(name)]
        self.check_sample_shape(model, tuple(sample.shape))
        batch = sample.shape[0]
        dtype, device = self.placement(model)
        if not sample.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor ({dtype} for this model), got {sample.dtype}")
        if sample.device != device:
            raise ValueError(
                f"{name} is on {sample.device}, the U-Net's weights on {device}: move the inputs, or the model "
                f"(runtime.to(device)), so that they match"
            )
        if sample.dtype != dtype and not torch.is_autocast_enabled(device.type):
            raise TypeError(
                f"{name} has dtype {sample.dtype}, the U-Net's weights {dtype}: cast the inputs, or the model "
                f"(runtime.to(dtype)), so that they match"
            )
        for other, tensor in zip(names, tensors, strict=True):
            if tensor.device != sample.device:
                raise ValueError(
                    f"{other} is on {tensor.device}, the {name} on {sample.device}: inputs must share a device"
                )
            # A batch of 1 may be broadcast by the model (IP-Adapter masks are): accepted as the
            # model accepts it, the capture traces what the model does with it.
            if tensor.ndim >= 1 and tensor.shape[0] not in (batch, 1):
                raise ValueError(
                    f"{other} has batch size {tensor.shape[0]} (shape {tuple(tensor.shape)}), the {name} {batch} "
                    f"(shape {tuple(sample.shape)}): every input needs the {name}'s batch size (or 1, to broadcast)"
                )
        if self.context_input in names:
            states = tensors[names.index(self.context_input)]
            width = self.context_width(model)
            if states.ndim != 3 or (width is not None and states.shape[-1] != width):
                want = f"(batch, tokens, {width if width is not None else 'dim'})"
                raise ValueError(f"{self.context_input} must have shape {want}, got {tuple(states.shape)}")

    def up_layers(self, model: nn.Module) -> list[UpLayer]:
        """Returns every up layer of ``model``, ordered by branch id (output end first)."""
        layers = []
        blocks = list(model.up_blocks)
        for block in reversed(range(len(blocks))):
            for layer in reversed(range(len(blocks[block].resnets))):
                layers.append(UpLayer(len(layers), block, layer))
        return layers

    def flatten(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Flat, bool]:
        """Returns the call as (names, tensors) and its ``return_dict``.

        Tensors keep their order of appearance in the forward signature; lists, tuples and
        dicts of tensors, nested, become ``name.i`` / ``name.key`` (IP-Adapter's
        ``added_cond_kwargs.image_embeds.0``). The timestep becomes a float32 tensor of shape
        (batch,), which is what the U-Net computes from any timestep form; the LoRA scale
        ``cross_attention_kwargs["scale"]`` a 0-d float64 tensor (see ``dcfx.adapters``).

        Raises:
            TypeError: for an argument that is none of these, or None (a graph cannot take it).
        """
        names, tensors, return_dict, _, _ = self.binder(model, len(args), tuple(kwargs)).flatten(args, kwargs)
        return (names, tensors), return_dict

    def binder(self, model: nn.Module, n_args: int, keywords: tuple[str, ...]) -> CallBinder:
        """Returns how a call with ``n_args`` positional arguments and these ``keywords`` flattens (cached).

        Raises:
            TypeError: the forward signature does not take such a call.
        """
        signature = self.signature(model)  # cached per class: its id names it (hashing it costs 20 us)
        key = (id(signature), n_args, keywords)
        binder = _BINDERS.get(key)
        if binder is None:
            binder = CallBinder(
                signature, n_args, keywords, type(model).__name__, self.sample_input, self.timestep_input
            )
            if len(_BINDERS) >= 256:
                _BINDERS.clear()
            _BINDERS[key] = binder
        return binder

    def signature(self, model: nn.Module) -> inspect.Signature:
        """Returns the signature of ``model.forward`` (without ``self``)."""
        return _signature(type(model))

    def call(self, model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        """Returns the output sample of ``model`` called with ``unflatten``'s ``kwargs`` (what capture traces).

        A LoRA scale among them is applied to the model's peft layers as a tensor, so that it
        stays an input of the captured graph (``dcfx.adapters.lora_scaled``).
        """
        attention = kwargs.get("cross_attention_kwargs")
        scale = None
        if isinstance(attention, dict) and "scale" in attention:
            attention = dict(attention)
            scale = attention.pop("scale")
            kwargs = {**kwargs, "cross_attention_kwargs": attention}
            if not attention and "cross_attention_kwargs" not in self.signature(model).parameters:
                del kwargs["cross_attention_kwargs"]  # the scale came in joint_attention_kwargs or attention_kwargs
        with lora_scaled(model, scale):
            return model(**kwargs, return_dict=False)[0]

    def output_class(self) -> Callable[..., Any]:
        """Returns the model's output dataclass (``UNet2DConditionOutput`` and the like)."""
        return _output_class(self.model_class)

    def output(self, sample: torch.Tensor, return_dict: bool) -> Any:
        """Returns ``sample`` as the wrapped model would: itself, its output dataclass or a 1-tuple."""
        if self.returns_tensor:
            return sample
        if not return_dict:
            return (sample,)
        return output_maker(self.output_class(), self.output_field)(sample)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Returns what a ``StoredSpec`` needs to call like ``model`` without its code (JSON-able)."""
        if self.returns_tensor:
            output = TENSOR_OUTPUT
        else:
            out = self.output_class()
            output = f"{out.__module__}:{out.__qualname__}"
        return {
            "class": type(model).__name__,
            "forward": [
                [p.name, p.default is inspect.Parameter.empty]
                for p in self.signature(model).parameters.values()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            ],
            "output": output,
            "output_field": self.output_field,
            "inputs": {"sample": self.sample_input, "timestep": self.timestep_input, "context": self.context_input},
            "sample_dims": list(self.sample_dims),
            "timestep_divisor": self.timestep_divisor,
            "context_width": self.context_width(model),
            "unbatched": list(self.unbatched_inputs(model)),
        }

    def unbatched_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """Returns the forward parameters whose tensors have no batch dimension (none for a U-Net)."""
        return ()

    def example_call(
        self, model: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        """Returns keyword arguments of a typical call with a sample of ``sample_shape``."""
        cfg = model.config
        batch = sample_shape[0]
        call: dict[str, Any] = {
            "sample": torch.randn(sample_shape, dtype=dtype, device=device),
            "timestep": torch.tensor(500.0, device=device),
        }
        params = _signature(type(model)).parameters
        if "encoder_hidden_states" in params:
            dim = cfg.cross_attention_dim
            dim = dim[0] if isinstance(dim, (tuple, list)) else dim
            tokens = 1 if "frames" in self.sample_dims else 77  # SVD: one CLIP image embedding
            call["encoder_hidden_states"] = torch.randn(batch, tokens, dim, dtype=dtype, device=device)
        if "added_time_ids" in params:  # SVD: fps, motion bucket id, noise augmentation strength
            n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
            call["added_time_ids"] = torch.tensor([6.0, 127.0, 0.02][:n_ids], dtype=dtype, device=device).repeat(
                batch, 1
            )
        if getattr(cfg, "num_class_embeds", None):
            call["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
        if getattr(cfg, "time_cond_proj_dim", None):
            call["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, dtype=dtype, device=device)
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            n_ids = 6
            text_dim = model.add_embedding.linear_1.in_features - n_ids * cfg.addition_time_embed_dim
            call["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, text_dim, dtype=dtype, device=device),
                "time_ids": torch.zeros(batch, n_ids, dtype=dtype, device=device),
            }
        elif getattr(cfg, "addition_embed_type", None):
            raise NotImplementedError(f"example inputs for addition_embed_type={cfg.addition_embed_type!r}")
        return call


@dataclass
class ModelOutput:
    """The output of a U-Net call when the model's own output class cannot be imported.

    Like diffusers' output classes it has the ``sample`` attribute and indexes as a 1-tuple.
    """

    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


@dataclass(frozen=True)
class StoredSpec(ModelSpec):
    """A ``ModelSpec`` rebuilt from ``ModelSpec.describe`` (an export's manifest), not from code.

    It flattens calls by the stored forward parameters and returns the stored output class
    when it can be imported (diffusers installed), else a ``ModelOutput``.
    """

    parameters: tuple[tuple[str, bool], ...] = ()
    output_path: str = ""
    unbatched: tuple[str, ...] = ()
    # The text states' width as recorded (a transformer's is not in its config's U-Net keys);
    # None with ``width_recorded`` False: a manifest from before it was recorded, read from the config.
    stored_context_width: int | None = None
    width_recorded: bool = False

    @classmethod
    def from_description(cls, model_class: type[nn.Module], description: Mapping[str, Any]) -> StoredSpec:
        """Returns the spec for ``description`` (``ModelSpec.describe``'s output)."""
        # Manifests written before the LDM layout have no "inputs": the diffusers names; before
        # transformers, no sample layout, divisor, text width or unbatched inputs: a U-Net's.
        inputs = {"sample": "sample", "timestep": "timestep", "context": "encoder_hidden_states"}
        inputs.update(description.get("inputs", {}))
        width = description.get("context_width")
        return cls(
            model_class=model_class,
            output_field=description["output_field"],
            sample_input=str(inputs["sample"]),
            timestep_input=str(inputs["timestep"]),
            context_input=str(inputs["context"]),
            returns_tensor=description["output"] == TENSOR_OUTPUT,
            sample_dims=tuple(str(d) for d in description.get("sample_dims", ModelSpec.sample_dims)),
            timestep_divisor=float(description.get("timestep_divisor", 1.0)),
            parameters=tuple((str(name), bool(required)) for name, required in description["forward"]),
            output_path=description["output"],
            unbatched=tuple(str(name) for name in description.get("unbatched", ())),
            stored_context_width=None if width is None else int(width),
            width_recorded="context_width" in description,
        )

    def context_width(self, model: nn.Module) -> int | None:  # noqa: D102
        return self.stored_context_width if self.width_recorded else super().context_width(model)

    def unbatched_inputs(self, model: nn.Module) -> tuple[str, ...]:  # noqa: D102
        return self.unbatched

    def check_inputs(self, model: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """As ``ModelSpec.check_inputs``, but inputs recorded as unbatched (Flux's token positions) have no batch."""
        kept = [(n, t) for n, t in zip(names, tensors, strict=True) if n not in self.unbatched]
        super().check_inputs(model, tuple(n for n, _ in kept), tuple(t for _, t in kept))

    def signature(self, model: nn.Module) -> inspect.Signature:  # noqa: D102
        return _stored_signature(self.parameters)

    def output_class(self) -> Callable[..., Any]:  # noqa: D102
        return _import_output(self.output_path)

    def up_layers(self, model: nn.Module) -> list[UpLayer]:  # noqa: D102
        raise TypeError("an exported model has its cut fixed at export time; its layers are in the manifest")


@functools.cache
def _stored_signature(parameters: tuple[tuple[str, bool], ...]) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = []
    for name, required in parameters:
        default = inspect.Parameter.empty if required else (True if name == "return_dict" else None)
        params.append(inspect.Parameter(name, kind, default=default))
    return inspect.Signature(params)


@functools.cache
def _import_output(path: str) -> Callable[..., Any]:
    # The path comes from a manifest: only a diffusers output class is imported, never any
    # other module (a directory on sys.path could otherwise ship code the import would run).
    module_name, _, qualname = path.partition(":")
    if not module_name.startswith("diffusers.") or not qualname.isidentifier():
        return ModelOutput
    try:
        from diffusers.utils import BaseOutput

        cls = getattr(importlib.import_module(module_name), qualname, None)
    except ImportError:
        return ModelOutput
    return cls if isinstance(cls, type) and issubclass(cls, BaseOutput) else ModelOutput


@functools.cache
def _signature(model_class: type) -> inspect.Signature:
    sig = inspect.signature(model_class.forward)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "self"])


@functools.cache
def _output_class(model_class: type) -> Callable[..., Any]:
    module = inspect.getmodule(model_class)
    name = model_class.__name__.replace("Model", "Output")
    out = getattr(module, name, None)
    if out is None:
        raise TypeError(f"no output class {name} next to {model_class.__name__}")
    return out


# ModelSpec.binder's cache: (id of a forward signature, positional count, keywords) -> binder.
_BINDERS: dict[tuple[int, int, tuple[str, ...]], CallBinder] = {}
