"""Branch inspection: every skip branch of a U-Net (or block range of a transformer), what it runs and costs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from dcfx.models import TransformerSpec, spec_for
from dcfx.passes import PassContext, capture, partition
from dcfx.passes.cuts import module_path

INTERVALS = (2, 3, 5, 10)


@dataclass(frozen=True)
class BranchInfo:
    """One skip branch: where it cuts, what the shallow graph keeps, and what it costs.

    ``flop_share`` is r, the shallow graph's FLOPs over the full graph's; ``ideal_speedup``
    maps N to N / (1 + (N - 1) r), the speedup of a 1:N schedule if time followed FLOPs.
    """

    branch: int
    up_layer: str
    cache_shape: tuple[int, ...]
    kept_layers: list[str]
    full_flops: int
    shallow_flops: int
    ideal_speedup: dict[int, float] = field(default_factory=dict)

    @property
    def flop_share(self) -> float:
        """Returns r, the shallow graph's share of the full graph's FLOPs."""
        return self.shallow_flops / self.full_flops


def ideal_speedup(interval: int, flop_share: float) -> float:
    """Returns N / (1 + (N - 1) r): the 1:N speedup when time is proportional to FLOPs."""
    return interval / (1 + (interval - 1) * flop_share)


def ideal_speedup_of_counts(full_steps: int, shallow_steps: int, flop_share: float) -> float:
    """Returns (full + shallow) / (full + shallow r): the speedup of these steps if time followed FLOPs.

    Equals ``ideal_speedup(N, r)`` when the step count is a multiple of N; use it for any other
    count and for non-uniform schedules.
    """
    if full_steps < 0 or shallow_steps < 0 or full_steps + shallow_steps == 0:
        raise ValueError(
            f"need non-negative step counts, not both zero; got {full_steps} full, {shallow_steps} shallow"
        )
    return (full_steps + shallow_steps) / (full_steps + shallow_steps * flop_share)


class _MetaInterpreter(fx.Interpreter):
    """Runs a graph on meta tensors: shapes only, no arithmetic, so any model size is cheap."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if "device" in kwargs:  # factory ops (arange, ones) name the capture's device
            kwargs = {**kwargs, "device": torch.device("meta")}
        if target is torch.ops.aten.view.default:
            # Meta kernels may lay out an output otherwise than the CPU kernel the capture saw
            # (Wan's attention): only shapes matter here, so a view may copy.
            target = torch.ops.aten.reshape.default
        return super().call_function(target, args, kwargs)


def flop_counts(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict[str, int]:
    """Returns the FLOPs per aten op that ``torch.utils.flop_counter`` counts for one call of ``gm``.

    The graph runs on meta tensors, where attention takes the math path (two bmm) and is
    counted; on a real CPU tensor the fused attention kernel is not counted at all.
    """
    meta_inputs = [t.to("meta") for t in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _MetaInterpreter(gm).run(*meta_inputs)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def count_flops(gm: fx.GraphModule, *inputs: torch.Tensor) -> int:
    """Returns the total FLOPs of one call of ``gm`` (see ``flop_counts``)."""
    return sum(flop_counts(gm, *inputs).values())


@dataclass(frozen=True)
class BlockRangeInfo:
    """One block range of a transformer: the blocks run every step, those cached, and the cost.

    ``first`` and ``last`` blocks run on every step; ``cached`` are the module paths of the
    blocks in between, which cached steps replace by their residual. ``flop_share`` is r, a
    cached step's FLOPs over a full step's.
    """

    first: int
    last: int
    cached: tuple[str, ...]
    full_flops: int
    shallow_flops: int
    ideal_speedup: dict[int, float] = field(default_factory=dict)

    @property
    def flop_share(self) -> float:
        """Returns r, a cached step's share of a full step's FLOPs."""
        return self.shallow_flops / self.full_flops


class _CountingInterpreter(_MetaInterpreter):
    """Runs a graph on meta tensors and adds up each node's FLOPs by the module it ran in."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, prefix: str) -> None:
        super().__init__(gm)
        self.counter = counter
        self.prefix = prefix
        self.by_module: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        spent = self.counter.get_total_flops() - before
        if spent:
            path = module_path(n, self.prefix)
            self.by_module[path] = self.by_module.get(path, 0) + spent
        return out


def block_ranges(model: nn.Module, sample_shape: tuple[int, ...] | None = None) -> list[BlockRangeInfo]:
    """Returns every ``(first, last)`` of a transformer with the FLOP share of its cached steps.

    One capture, its FLOPs counted per block on meta tensors; a cached step costs the full
    step less its cached blocks (the residual's addition is not counted, as no elementwise op
    is). Ordered by ``first``, then ``last``.
    """
    spec = spec_for(model)
    if not isinstance(spec, TransformerSpec):
        raise TypeError(f"{type(model).__name__} is not a diffusion transformer: see dcfx.branches")
    if sample_shape is None:
        size = spec.default_size(model)
        sample_shape = spec.sample_shape(model, 2, size, size)
    param = next(model.parameters())
    return block_ranges_of_call(model, spec.example_call(model, tuple(sample_shape), param.dtype, param.device))


def block_ranges_of_call(model: nn.Module, call: Mapping[str, Any]) -> list[BlockRangeInfo]:
    """Returns every ``(first, last)`` as ``block_ranges`` does, measured on the keyword call ``call``.

    For the inputs a pipeline really passes (its prompt length, its batch with guidance).
    """
    spec = spec_for(model)
    (names, tensors), _ = spec.flatten(model, (), dict(call))
    captured = capture(model, names, tensors, spec=spec)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        interpreter = _CountingInterpreter(captured, counter, "unet.")
        interpreter.run(*[t.to("meta") for t in tensors])
    total = sum(interpreter.by_module.values())
    blocks = spec.blocks(model)

    def cost(path: str) -> int:
        return sum(n for p, n in interpreter.by_module.items() if p == path or p.startswith(path + "."))

    per_block = [cost(path) for path in blocks]
    infos = []
    for first in range(len(blocks)):
        for last in range(len(blocks) - first):
            cached = blocks[first : len(blocks) - last]
            shallow = total - sum(per_block[first : len(blocks) - last])
            r = shallow / total
            speed = {n: ideal_speedup(n, r) for n in INTERVALS}
            infos.append(BlockRangeInfo(first, last, tuple(cached), total, shallow, speed))
    return infos


def format_block_ranges(infos: list[BlockRangeInfo]) -> str:
    """Returns a text table of ``infos``, one row per block range."""
    head = f"{'first':>5} {'last':>4}  {'cached blocks':<44} {'r':>6}  " + "  ".join(
        f"{'N=' + str(n):>6}" for n in INTERVALS
    )
    rows = [head]
    for b in infos:
        cached = f"{b.cached[0]} .. {b.cached[-1]} ({len(b.cached)})"
        speed = "  ".join(f"{b.ideal_speedup[n]:>5.2f}x" for n in INTERVALS)
        rows.append(f"{b.first:>5} {b.last:>4}  {cached:<44} {b.flop_share:>6.3f}  {speed}")
    return "\n".join(rows)


def branches(unet: nn.Module, sample_shape: tuple[int, ...] | None = None) -> list[Any]:
    """Returns every valid skip branch of ``unet`` with its cache shape and FLOP share.

    For a diffusion transformer, every ``(first, last)`` as ``block_ranges`` returns them
    (``BlockRangeInfo``): a transformer is cut at a block range, not a branch.

    Args:
        unet: A supported U-Net (diffusers, or the latent-diffusion ``UNetModel`` layout).
        sample_shape: (batch, channels, height, width) of the latents ((batch, frames,
            channels, height, width) for a video U-Net); default: batch 2 at the model's
            ``sample_size`` (``image_size`` for a latent-diffusion ``UNetModel``).

    Example:
        >>> [(b.branch, round(b.flop_share, 3)) for b in dcfx.branches(unet, (2, 4, 64, 64))][:3]
        [(0, 0.079), (1, 0.224), (2, 0.38)]   # SD1.5 (benchmarks/layout_shares.py)
    """
    spec = spec_for(unet)
    if isinstance(spec, TransformerSpec):
        return block_ranges(unet, sample_shape)
    if sample_shape is None:
        size = spec.default_size(unet)
        sample_shape = spec.sample_shape(unet, 2, size, size)
    spec.check_sample_shape(unet, tuple(sample_shape))
    param = next(unet.parameters())
    return branches_of_call(unet, spec.example_call(unet, tuple(sample_shape), param.dtype, param.device))


def branches_of_call(unet: nn.Module, call: Mapping[str, Any]) -> list[BranchInfo]:
    """Returns every skip branch of ``unet`` as ``branches`` does, measured on the keyword call ``call``.

    For inputs the built-in example call does not guess (a context of one token, as a class
    embedding gives, rather than a 77-token prompt).
    """
    spec = spec_for(unet)
    (names, tensors), _ = spec.flatten(unet, (), dict(call))
    captured = capture(unet, names, tensors, spec=spec)
    full_flops = None
    infos = []
    for layer in spec.up_layers(unet):
        pair = partition(captured, PassContext(model=unet, spec=spec, input_names=names, layer=layer))
        if full_flops is None:
            full_flops = count_flops(pair.full, *tensors)
        feature = torch.empty(pair.feature_shape, dtype=pair.feature_dtype, device=tensors[0].device)
        shallow_flops = count_flops(pair.shallow, *tensors, feature)
        r = shallow_flops / full_flops
        infos.append(
            BranchInfo(
                branch=layer.branch,
                up_layer=layer.path,
                cache_shape=tuple(int(s) for s in pair.feature_shape),
                kept_layers=pair.kept_layers,
                full_flops=full_flops,
                shallow_flops=shallow_flops,
                ideal_speedup={n: ideal_speedup(n, r) for n in INTERVALS},
            )
        )
    return infos


def format_branches(infos: list[Any]) -> str:
    """Returns a text table of ``infos``, one row per branch (or block range)."""
    if infos and isinstance(infos[0], BlockRangeInfo):
        return format_block_ranges(infos)
    head = f"{'branch':>6}  {'up layer':<22} {'cache shape':<20} {'r':>6}  " + "  ".join(
        f"{'N=' + str(n):>6}" for n in INTERVALS
    )
    rows = [head]
    for b in infos:
        speed = "  ".join(f"{b.ideal_speedup[n]:>5.2f}x" for n in INTERVALS)
        rows.append(f"{b.branch:>6}  {b.up_layer:<22} {list(b.cache_shape)!s:<20} {b.flop_share:>6.3f}  {speed}")
    return "\n".join(rows)
