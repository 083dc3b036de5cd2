"""The Inductor backend: each graph through ``torch.compile`` (fullgraph, static shapes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dcfx.backends import CompiledPair, compile_lock, register_backend, warm_up
from dcfx.passes import forget_graphs

OPTIONS = ("mode", "options")

# On the SD1.5 U-Net at 32x32 latents, batch 2, 2 CPU cores: default Inductor ran the full
# graph 1.45x slower than eager (4.45 s against 3.06 s per call, measured before dcfx's first
# release); with freezing, 1.33x faster (median of 5, benchmarks/graph_speed.py). Freezing
# folds the weights into the compiled code, so the pair does not follow weights written in
# place: the runtime rebuilds it when they change.
#
# Freezing as torch sets it up also prepacks weights (CPU) and re-lays-out convolution weights
# (channels-last), and those folded copies are made per compiled graph: each static pair held
# its own copy of the weights. With both off, the frozen graphs read the model's own weights:
# one copy per process whatever the shapes. SD1.5 config, batch 2, 2 CPU cores
# (benchmarks/startup_memory.py, variants inductor-* against inductor-copy-*): resident 4.1 GB
# at one shape and 4.4 GB at three (the model alone 3.7 GB), where the copies took 7.7 and
# 15.3 GB; the price is the full step on the CPU, 1.95 s per call at 32x32 against 1.27 s
# (shallow steps equal). options={"cpp.weight_prepack": True, "layout_optimization": True}
# buys that speed back, at a copy of the weights per shape.
DEFAULT_INDUCTOR_OPTIONS = {"freezing": True, "cpp.weight_prepack": False, "layout_optimization": False}


class _FirstCallPatched:
    """Calls a ``torch.compile`` wrapper, with Inductor settings patched while it compiles.

    ``torch.compile(options=...)`` reaches Inductor only, but freezing must also be on while
    dynamo traces: otherwise the parameters become graph inputs, nothing is frozen and the
    weights are re-laid-out on every call (seen on torch 2.13: frozen SD1.5 full graph 4.0 s,
    eager 3.1 s). The patch is scoped to the compiling call; no global stays changed.
    """

    def __init__(self, compiled: Callable[..., Any], settings: dict[str, Any]) -> None:
        self._compiled = compiled
        self._settings = settings
        self._warm = False

    def __call__(self, *args: torch.Tensor) -> Any:
        if self._warm:
            return self._compiled(*args)
        import torch._inductor.config as inductor_config  # private; checked on torch 2.6-2.13

        with compile_lock, inductor_config.patch(self._settings):
            out = self._compiled(*args)
        self._warm = True
        return out


@register_backend("inductor", options=OPTIONS)
def inductor(
    full: torch.nn.Module,
    shallow: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    forecast: torch.nn.Module | None = None,
    **options: Any,
) -> CompiledPair:
    """Returns both graphs compiled by ``torch.compile`` for calls shaped like ``example_inputs``.

    Options: ``mode`` (as torch.compile's) and ``options`` (Inductor settings for these two
    graphs only, merged over ``DEFAULT_INDUCTOR_OPTIONS``). Nothing global is changed. Each
    graph pair is compiled for one input shape, here, on ``example_inputs``: the runtime keeps
    one pair per shape, so the steps of a generation never compile or recompile.
    """
    mode = options.get("mode")
    if mode is not None and options.get("options"):
        raise TypeError("inductor: pass either mode= or options=, as torch.compile takes one of them")
    settings = {**DEFAULT_INDUCTOR_OPTIONS, **(options.get("options") or {})}

    def compile_graph(gm: torch.nn.Module) -> Callable[..., Any]:
        if mode is not None:
            compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False, mode=mode)
            return _FirstCallPatched(compiled, DEFAULT_INDUCTOR_OPTIONS)
        compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False, options=settings)
        return _FirstCallPatched(compiled, settings)

    frozen = bool(DEFAULT_INDUCTOR_OPTIONS["freezing"] if mode is not None else settings.get("freezing"))
    graphs = [g for g in (full, shallow, forecast) if g is not None]
    pair = CompiledPair(
        full=compile_graph(full),
        shallow=compile_graph(shallow),
        forecast=None if forecast is None else compile_graph(forecast),
        release=lambda: forget_graphs(*graphs),
        follows_values=not frozen,
    )
    warm_up(pair, example_inputs)
    return pair
