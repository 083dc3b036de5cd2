"""The cache rows of the serving engine: which generation's feature lies in which rows of which buffer.

A full call of the engine writes the cache features of its generations into one pooled
buffer (a ``CacheGroup``); each generation's plan (``dcfx.planner``) holds its rows as
anchors (``Rows``) and releases them when it no longer reads them, and the buffer goes back
to the pool when no anchor holds rows of it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import torch

Slot = tuple[Any, int]  # a generation (None: padding) and its number of rows
Rows = tuple["CacheGroup", int]  # a generation's cache rows: the group (full call) and its first row there


def release(payloads: Iterable[Rows]) -> None:
    """Lets go of cache rows a generation's plan no longer holds (their buffer goes back when none does)."""
    for group, _ in payloads:
        group.leave()


class CacheGroup:
    """The cache rows one full call wrote: which generation sits in which rows of which buffer.

    ``live`` counts the generation anchors (``dcfx.planner``) that hold rows of it.
    """

    def __init__(self, layout: list[Slot], padded: int, pool: BufferPool) -> None:
        self.layout = layout
        self.padded = padded
        self.pool = pool
        self.buffer: torch.Tensor | None = None  # the call's rows of a pooled buffer
        self._pooled: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self.live = sum(1 for g, _ in layout if g is not None)

    def buffer_for(
        self, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Returns the rows of a pooled buffer that the full call writes the feature into."""
        self._pooled = self.pool.take(shape, stride, dtype, device)
        self.buffer = self._pooled[1][: shape[0]]
        return self.buffer

    def leave(self) -> None:
        """One generation no longer reads these rows; the buffer goes back when none does."""
        self.live -= 1
        if self.live <= 0 and self._pooled is not None:
            self.pool.give(*self._pooled)
            self._pooled = self.buffer = None


class BufferPool:
    """Feature buffers of ``capacity`` rows, reused by a cohort's full calls (no allocation per step)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: dict[tuple[Any, ...], list[torch.Tensor]] = collections.defaultdict(list)
        self.allocated = 0

    def take(
        self, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[Any, ...], torch.Tensor]:
        """Returns a free buffer for features of this layout (its key and the whole buffer)."""
        key = (tuple(shape[1:]), tuple(stride), dtype, device)
        free = self.free[key]
        if free:
            return key, free.pop()
        # The feature's own strides (some features come out channels-last), over capacity rows:
        # the first n rows then have exactly the strides a call of n rows produces.
        self.allocated += 1
        base = torch.empty_strided((self.capacity, *shape[1:]), tuple(stride), dtype=dtype, device=device)
        return key, base

    def give(self, key: tuple[Any, ...], base: torch.Tensor) -> None:
        """Takes a buffer back."""
        self.free[key].append(base)


def offsets(layout: list[Slot]) -> list[int]:
    """Returns the first row of each slot of ``layout``."""
    offsets, row = [], 0
    for _, rows in layout:
        offsets.append(row)
        row += rows
    return offsets
