"""A batching stage: items from many requests run as one call, in a thread of the stage's own.

A served pipeline has three stages: text encoding, the denoising engine, VAE decoding. The
engine batches denoising steps (``dcfx.serve.engine``); the two others are ``BatchStage``s, so
that the text encoder and the VAE also run once for what many requests need at that moment,
not once per request while the denoiser batches.

A stage takes every item waiting when it is free (at most ``max_items``; of one group key, the
oldest item's, when items of several keys wait: a VAE decodes latents of one size together)
and runs ``run(items) -> results``, one result per item, in the order given. An item that
arrives while a call runs waits for the next call: nothing is held back to fill a batch, so a
lone request pays no wait.

Example:
    >>> stage = BatchStage("double", lambda xs: [2 * x for x in xs])
    >>> stage.submit(21).result()
    42
    >>> stage.close()
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from dcfx.serve.request import EngineStopped
from dcfx.util import check_int

__all__ = ["BatchStage"]

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchStage(Generic[Item, Result]):
    """Runs ``run`` on batches of submitted items in a thread of its own.

    Args:
        name: What logs and errors call the stage ("text encoder", "VAE decoder").
        run: Takes a list of items (all of one ``key``), returns one result per item.
        max_items: Items per call at most.
        key: Items of one key may share a call (default: all may).
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[Item]], Sequence[Result]],
        max_items: int = 16,
        key: Callable[[Item], Hashable] | None = None,
    ) -> None:
        check_int("max_items", max_items, 1)
        self.name = name
        self._run = run
        self._key = key or (lambda item: None)
        self.max_items = max_items
        self._pending: collections.deque[tuple[Item, Hashable, Future[Result]]] = collections.deque()
        self._lock = threading.Condition()
        self._closing = False
        # What ran: calls, items, and calls by their number of items (to see the batching).
        self.counts: collections.Counter[str] = collections.Counter(calls=0, items=0, failed_calls=0)
        self.sizes: collections.Counter[int] = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name=f"dcfx-serve-{name.replace(' ', '-')}", daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> Future[Result]:
        """Queues ``item``; returns the future of its result (EngineStopped once the stage closes)."""
        future: Future[Result] = Future()
        key = self._key(item)
        with self._lock:
            if self._closing:
                raise EngineStopped(f"the {self.name} stage is shutting down and takes no new work")
            self._pending.append((item, key, future))
            self._lock.notify_all()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finishes the items already queued, then stops the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """Returns calls, items, failed calls, items waiting, and calls by their number of items."""
        with self._lock:
            return {**self.counts, "waiting": len(self._pending), "items_per_call": dict(sorted(self.sizes.items()))}

    def _take(self) -> list[tuple[Item, Hashable, Future[Result]]]:
        """Returns the next call's items (the oldest item's key); empty once closed and drained."""
        with self._lock:
            while not self._pending and not self._closing:
                self._lock.wait()
            if not self._pending:
                return []
            key = self._pending[0][1]
            taken, kept = [], collections.deque()
            for entry in self._pending:
                if entry[1] == key and len(taken) < self.max_items:
                    taken.append(entry)
                else:
                    kept.append(entry)
            self._pending = kept
            return taken

    def _loop(self) -> None:
        while batch := self._take():
            live = [entry for entry in batch if entry[2].set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = list(self._run([item for item, _, _ in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"the {self.name} stage returned {len(results)} results for {len(live)} items")
            except Exception as e:  # the call failed: its items fail, the stage goes on
                logger.exception("dcfx.serve: a %s call of %d items failed", self.name, len(live))
                with self._lock:
                    self.counts["failed_calls"] += 1
                for _, _, future in live:
                    future.set_exception(e)
                continue
            with self._lock:
                self.counts["calls"] += 1
                self.counts["items"] += len(live)
                self.sizes[len(live)] += 1
            for (_, _, future), result in zip(live, results, strict=True):
                future.set_result(result)
