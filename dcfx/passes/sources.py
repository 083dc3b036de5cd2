"""The generated source of GraphModules: torch.fx keeps each one for good; dcfx lets go of its own.

Every ``GraphModule.recompile()`` stores the Python source it generated in
``torch.fx.graph_module._loader.eval_cache`` and a lazy ``linecache`` entry, under a key that is
also the code's file name, and nothing ever removes them. A graph build recompiles about fifteen
intermediate graphs; for a small U-Net that kept about 2 MB per build, so a server that builds
graphs for new shapes grew without bound (benchmarks/soak.py found it). ``build_graph_pair``
forgets the intermediates' sources at once, and a backend forgets its final graphs' when the
runtime drops them. ``_loader`` is private: wrapped here only, checked on torch 2.6-2.13.
"""

from __future__ import annotations

import linecache
from collections.abc import Iterable

from torch import fx


def _cache() -> dict[str, str]:
    loader = getattr(fx.graph_module, "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    return cache if isinstance(cache, dict) else {}


def cached_sources() -> set[str]:
    """Returns the keys (code file names) of every GraphModule source torch.fx holds now."""
    return set(_cache())


def source_key(gm: fx.GraphModule) -> str | None:
    """Returns the key of ``gm``'s generated forward, or None when it has none."""
    code = getattr(type(gm).forward, "__code__", None)
    return None if code is None else code.co_filename


def forget_sources(keys: Iterable[str | None]) -> None:
    """Drops the sources stored under ``keys`` (tracebacks through that code lose their source lines)."""
    cache = _cache()
    for key in keys:
        if key is not None and key in cache:
            del cache[key]
            linecache.cache.pop(key, None)


def forget_graphs(*graphs: fx.GraphModule) -> None:
    """Drops the generated sources of ``graphs`` (call it when they are no longer used)."""
    forget_sources(source_key(gm) for gm in graphs)
