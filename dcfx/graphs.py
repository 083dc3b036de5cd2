"""A runtime's graph pairs: built on demand, kept within bounds, dropped when the model changes.

``GraphCache`` maps each input signature (names, shapes, dtypes and devices of the flat
inputs, and the weights' dtype and device) to the pair that serves it, through the runtime's
``Build``. A build over ranges serves every signature of a bucket with one pair. At most
``MAX_GRAPH_PAIRS`` pairs are kept, the least recently used dropped first. Before each build
and at each generation's start the model is checked against what the graphs baked in
(``dcfx.watch.ModelWatch``): a change drops the pairs, which are built again.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import torch
from torch import nn

from dcfx.backends import Build, CompiledPair, compile_lock
from dcfx.hooks import check_hooks
from dcfx.limits import MAX_GRAPH_PAIRS, MAX_SIGNATURES
from dcfx.watch import Changes, ModelWatch

# Logged as the runtime (users filter on "dcfx.runtime"): the graphs are its part.
logger = logging.getLogger("dcfx.runtime")

Signature = tuple[
    tuple[str, ...],
    tuple[tuple[torch.Size, torch.dtype, torch.device], ...],
    tuple[torch.dtype, torch.device] | None,  # the weights' dtype and device
]


class GraphCache:
    """The pairs of one runtime (see the module docstring). Thread-safe; builds take turns.

    ``pairs`` maps signatures to pairs (several signatures may share one: see ``buckets``);
    ``builds`` counts the pairs built.
    """

    def __init__(self, model: nn.Module, spec: Any, build: Build) -> None:
        self.model = model
        self.spec = spec
        self.build = build
        self.pairs: dict[Signature, CompiledPair] = {}
        self.buckets: dict[Any, CompiledPair] = {}  # a ranged build's bucket -> the pair serving it
        self.builds = 0
        self._used: dict[int, int] = {}  # id(pair) -> tick of its last use
        self._ticks = itertools.count()
        self._lock = threading.Lock()  # guards the maps; never held while a graph runs
        self._check_lock = threading.Lock()  # one model-change check at a time
        self._watch = ModelWatch(model)
        self._dropped_for: Changes | None = None  # the change that dropped the pairs, until rebuilt
        self._probe: torch.Tensor | None = None  # a parameter: its dtype and device join each signature

    def signature(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Signature:
        """Returns the signature of a call with flat inputs ``names``, ``tensors``."""
        return names, tuple([(t.shape, t.dtype, t.device) for t in tensors]), self._weights_key()

    def get(
        self, key: Signature, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool
    ) -> CompiledPair:
        """Returns the pair serving ``key``, built (with the forecast graph when ``forecast``) if missing."""
        pair = self.pairs.get(key)
        if pair is None:
            pair = self._new_pair(key, names, tensors, forecast)
        self._used[id(pair)] = next(self._ticks)
        return pair

    def check_model(self) -> None:
        """Drops the pairs when the model no longer matches what they baked in."""
        # About 0.5 ms on SD1.5 (dcfx.watch). Captures work on a clone of the module tree, so
        # the module read here is never half-swapped by a capture in another thread.
        with self._check_lock:
            changes = self._watch.changes()
            if changes is None:
                return
            self._probe = None
            if changes.only_written and all(pair.follows_values for pair in list(self.pairs.values())):
                self._watch.record()  # weights written in place: the graphs read the live storage
                return
            logger.info("dcfx: the U-Net changed since its graphs were built (%s); building them again", changes)
            self.drop()
            self._dropped_for = changes

    def drop(self) -> None:
        """Drops every pair and releases what each keeps beyond itself."""
        with self._lock:
            pairs = list({id(p): p for p in self.pairs.values()}.values())
            self.pairs.clear()
            self.buckets.clear()
            self._used.clear()
            self._watch.forget()
        for pair in pairs:
            _release(pair)

    def _weights_key(self) -> tuple[torch.dtype, torch.device] | None:
        probe = self._probe
        if probe is None:
            probe = self._probe = next(self.model.parameters(), None)
            if probe is None:
                return None
        return probe.dtype, probe.device

    def _new_pair(
        self, key: Signature, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], forecast: bool
    ) -> CompiledPair:
        # Builds take turns (torch.export and Inductor keep process-wide state while they
        # trace); the steps of built graphs in other threads go on meanwhile.
        with compile_lock:
            pair = self.pairs.get(key)  # built by another thread while this one waited
            if pair is not None:
                return pair
            self.check_model()  # a change since this generation began must not leave other graphs stale
            check_hooks(self.model)  # offloading hooks are named before a device check would misread them
            self.spec.check_inputs(self.model, names, tensors)
            # A build over ranges (dynamic shapes) serves every call of a bucket with one pair.
            bucket_key = self.build.bucket(names, tensors)
            if bucket_key is not None:
                bucket_key = (bucket_key, key[2])
                pair = self.buckets.get(bucket_key)
            if pair is None:
                logger.info("dcfx: building graphs for %s", [tuple(s) for s, _, _ in key[1]])
                try:
                    pair = self.build(names, tensors, **({"forecast": True} if forecast else {}))
                except Exception as e:
                    if self._dropped_for is not None:
                        raise _rebuild_failed(self._dropped_for, e) from e
                    raise
                self._watch.record()
                self._dropped_for = None
                self.builds += 1
            with self._lock:
                self.pairs[key] = pair
                if bucket_key is not None:
                    self.buckets[bucket_key] = pair
                self._used[id(pair)] = next(self._ticks)
                evicted = self._evict()
        for old in evicted:
            _release(old)
        return pair

    def _evict(self) -> list[CompiledPair]:
        # Under self._lock. At most MAX_GRAPH_PAIRS distinct pairs, the least recently used
        # dropped first with every signature that led to it; a pair shared by many signatures
        # (a bucket) keeps at most MAX_SIGNATURES of them, the pair itself staying.
        pairs = {id(p): p for p in self.pairs.values()}
        evicted = []
        while len(pairs) > MAX_GRAPH_PAIRS:
            oldest = min(pairs, key=lambda i: self._used.get(i, -1))
            evicted.append(pairs.pop(oldest))
            for k in [k for k, p in self.pairs.items() if id(p) == oldest]:
                del self.pairs[k]
            for b in [b for b, p in self.buckets.items() if id(p) == oldest]:
                del self.buckets[b]
            self._used.pop(oldest, None)
        bucketed = {id(p) for p in self.buckets.values()}
        for k in [k for k, p in self.pairs.items() if id(p) in bucketed][: max(0, len(self.pairs) - MAX_SIGNATURES)]:
            del self.pairs[k]  # found again through its bucket
        return evicted


def _rebuild_failed(changes: Changes, error: Exception) -> Exception:
    message = f"the U-Net changed since its graphs were built ({changes}), and building them again failed: {error}"
    try:
        return type(error)(message)
    except Exception:  # an exception class that takes other arguments
        return RuntimeError(message)


def _release(pair: CompiledPair) -> None:
    if pair.release is not None:
        pair.release()
