"""How a U-Net call flattens into named graph inputs, and back.

``CallBinder`` maps one form of call (so many positional arguments, these keywords) onto the
forward's parameters once and replays it every step; ``unflatten`` rebuilds the keyword
arguments from the flat names; ``normalize_timestep`` gives the timestep the graphs take.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dcfx.adapters import ATTENTION_KWARGS, SCALE_INPUT, scale_tensor


def unflatten(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Returns the keyword arguments that ``ModelSpec.flatten`` turned into ``names``.

    ``name.key`` entries become dicts and ``name.i`` entries lists (diffusers pops T2I-Adapter
    residuals off theirs), at any depth: ``added_cond_kwargs.image_embeds.0`` comes back as
    ``{"added_cond_kwargs": {"image_embeds": [tensor]}}``.
    """
    tree: dict[str, Any] = {}
    for name, tensor in zip(names, tensors, strict=True):
        *heads, last = name.split(".")
        node = tree
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = tensor
    return {k: _listify(v) for k, v in tree.items()}


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        # None entries of a list were not graph inputs: they come back as None, in place.
        return [items.get(str(i)) for i in range(max(map(int, items)) + 1)]
    return items


_REAL_DTYPES = frozenset(
    {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8}
)


def normalize_timestep(timestep: Any, sample: torch.Tensor, value: float | None = None) -> torch.Tensor:
    """Returns ``timestep`` as a float32 tensor of shape (batch,) on the sample's device.

    ``value``, the timestep read on the host (``host_timestep``), when the caller has it: the
    tensor for a value is then made once and reused (a 0-d float32 tensor expanded to the
    batch: stride 0, as the graphs were built for), which spares every step a cast.
    """
    batch = sample.shape[0]
    if (
        isinstance(timestep, torch.Tensor)
        and timestep.ndim <= 1
        and timestep.dtype in _REAL_DTYPES
        and timestep.device == sample.device
    ):
        # What pipelines pass, every step: no copy, at most a cast and a view.
        if timestep.ndim == 1 and timestep.shape[0] not in (1, batch):
            want = f"a scalar or have shape ({batch},) to match the batch"
            raise ValueError(f"timestep must be {want}, got shape {tuple(timestep.shape)}")
        if value is not None and (timestep.ndim == 0 or timestep.shape[0] == 1):
            return _timestep_tensor(value, batch, sample.device)
        return timestep.to(torch.float32).expand(batch)
    if isinstance(timestep, bool) or not isinstance(timestep, (int, float, torch.Tensor)):
        raise TypeError(f"timestep must be a tensor, int or float, got {type(timestep).__name__}")
    t = torch.as_tensor(timestep, device=sample.device)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep must hold real numbers, got a {t.dtype} tensor")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(
            f"timestep must be a scalar or have shape ({batch},) to match the batch, got shape {tuple(t.shape)}"
        )
    return t.to(torch.float32).reshape(-1).expand(batch)


_TIMESTEPS: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def _timestep_tensor(value: float, batch: int, device: torch.device) -> torch.Tensor:
    key = (value, batch, device)
    tensor = _TIMESTEPS.get(key)
    if tensor is None:
        if len(_TIMESTEPS) >= 4096:
            _TIMESTEPS.clear()
        # float32 rounding as .to(torch.float32) does it; never written to (graphs take inputs read-only).
        tensor = _TIMESTEPS[key] = torch.tensor(value, dtype=torch.float32, device=device).expand(batch)
    return tensor


def host_timestep(timestep: Any) -> float | None:
    """Returns the value of a call's timestep as passed, where reading it costs no device sync; else None."""
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel() >= 1:
        if timestep.dtype == torch.bool or timestep.is_complex():
            return None
        return float(timestep.reshape(-1)[0]) if timestep.ndim else timestep.item()
    return None


def _flatten_value(name: str, value: Any, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if name in ATTENTION_KWARGS and isinstance(value, Mapping) and "scale" in value:
        rest = {k: v for k, v in value.items() if k != "scale"}
        return [(SCALE_INPUT, scale_tensor(value["scale"], device)), *_flatten_value(name, rest, device)]
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in _flatten_value(f"{name}.{i}", v, device)]
    if isinstance(value, Mapping):
        return [item for k in sorted(value) for item in _flatten_value(f"{name}.{_key(name, k)}", value[k], device)]
    raise TypeError(
        f"dcfx cannot pass {name}={value!r} into a captured graph: only tensors, lists, tuples and dicts of "
        f"tensors (or None), and the LoRA 'scale' of {', '.join(ATTENTION_KWARGS)}, are graph inputs"
    )


def _key(name: str, key: Any) -> str:
    if not isinstance(key, str) or not key.isidentifier():
        raise TypeError(f"dcfx cannot pass {name} with the key {key!r} into a captured graph: keys must be identifiers")
    return key


_Source = int | str  # a positional index or a keyword name


class CallBinder:
    """How calls of one form (so many positional arguments, these keywords) flatten.

    ``inspect.Signature.bind`` costs about 20 us a call; a U-Net is called the same way on
    every step, so the binding is worked out once per form and replayed.
    """

    def __init__(
        self,
        signature: inspect.Signature,
        n_args: int,
        keywords: tuple[str, ...],
        owner: str,
        sample_input: str = "sample",
        timestep_input: str = "timestep",
    ) -> None:
        try:
            signature.bind(*range(n_args), **dict.fromkeys(keywords))
        except TypeError as e:
            raise TypeError(f"{owner}.forward: {e}") from None
        sources: list[tuple[str, _Source]] = []
        for i, param in enumerate(signature.parameters.values()):
            if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise TypeError(f"{owner}.forward takes *args or **kwargs: dcfx cannot map its calls to graph inputs")
            if i < n_args:
                sources.append((param.name, i))
            elif param.name in keywords:
                sources.append((param.name, param.name))
        self.sources = tuple(sources)
        self.sample_name = sample_input
        self.timestep_name = timestep_input
        self.sample: _Source | None = next((src for name, src in sources if name == sample_input), None)

    def flatten(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...], bool, torch.Tensor | None, float | None]:
        """Returns the call's input names and tensors, ``return_dict``, and the timestep.

        The timestep comes as the graph input (float32, shape (batch,)) and as its value read
        on the host where that costs no device sync (else None).
        """
        at = self.sample
        sample = None if at is None else (args[at] if type(at) is int else kwargs[at])
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"{self.sample_name} must be a torch.Tensor, got {type(sample).__name__}")
        if sample.ndim == 0 or sample.shape[0] < 1:
            shape = tuple(sample.shape)
            raise ValueError(f"{self.sample_name} must have a batch dimension of size >= 1, got shape {shape}")
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        return_dict = True
        timestep = host = None
        for name, src in self.sources:
            value = args[src] if type(src) is int else kwargs[src]
            if value is None:
                continue
            if name == "return_dict":
                return_dict = bool(value)
                continue
            if name == self.timestep_name:
                host = host_timestep(value)
                value = timestep = normalize_timestep(value, sample, host)
            if isinstance(value, torch.Tensor):
                names.append(name)
                tensors.append(value)
            else:
                for key, tensor in _flatten_value(name, value, sample.device):
                    names.append(key)
                    tensors.append(tensor)
        return tuple(names), tuple(tensors), return_dict, timestep, host


@functools.cache
def output_maker(cls: Callable[..., Any], field: str) -> Callable[[torch.Tensor], Any]:
    """Returns a fast constructor of ``cls(**{field: sample})``, where a fast one gives the same object.

    diffusers' output classes (dataclasses over an OrderedDict) spend about 10 us in their
    ``__post_init__`` per object; a U-Net call returns one per step. The fast path builds the
    same state directly, and is used only if it matches the real constructor's result.
    """

    def slow(sample: torch.Tensor) -> Any:
        return cls(**{field: sample})

    if not (isinstance(cls, type) and issubclass(cls, OrderedDict) and dataclasses.is_dataclass(cls)):
        return slow
    if [f.name for f in dataclasses.fields(cls)] != [field]:
        return slow

    def fast(sample: torch.Tensor) -> Any:
        out = cls.__new__(cls)
        OrderedDict.__init__(out)
        OrderedDict.__setitem__(out, field, sample)
        object.__setattr__(out, field, sample)
        return out

    probe = torch.zeros(1)
    a, b = slow(probe), fast(probe)
    same = type(a) is type(b) and vars(a) == vars(b) and list(a.items()) == list(b.items()) and a[0] is b[0]
    return fast if same else slow
