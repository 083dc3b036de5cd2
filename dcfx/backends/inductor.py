"""The Inductor backend: each graph through ``torch.compile`` (fullgraph, static shapes)."""

from __future__ import annotations

from typing import Any

import torch

from dcfx.backends import CompiledPair, register_backend

OPTIONS = ("mode", "options")

# Measured on the SD1.5 U-Net at 32x32 latents on 2 CPU cores: default Inductor ran the full
# graph 1.45x slower than eager, Inductor with freezing 1.25x faster. Freezing folds the
# weights into the compiled code: weights changed after the first call are not seen.
DEFAULT_INDUCTOR_OPTIONS = {"freezing": True}


@register_backend("inductor", options=OPTIONS)
def inductor(
    full: torch.nn.Module, shallow: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], **options: Any
) -> CompiledPair:
    """Returns both graphs wrapped by ``torch.compile``; compilation happens on the first call.

    Options: ``mode`` (as torch.compile's) and ``options`` (Inductor settings for these two
    graphs only, merged over ``DEFAULT_INDUCTOR_OPTIONS``). Nothing global is changed. Each
    graph pair is compiled for one input shape: the runtime keeps one pair per shape, so the
    steps of a generation never recompile.
    """
    settings = {**DEFAULT_INDUCTOR_OPTIONS, **(options.get("options") or {})}
    mode = options.get("mode")
    if mode is not None and options.get("options"):
        raise TypeError("inductor: pass either mode= or options=, as torch.compile takes one of them")

    def compile_graph(gm: torch.nn.Module) -> Any:
        if mode is not None:
            return torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False, mode=mode)
        return torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False, options=settings)

    return CompiledPair(full=compile_graph(full), shallow=compile_graph(shallow))
