"""How the serving engine batches: ``EngineConfig``, its batch sizes and admission policy."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcfx.util import check_int

BATCHING = ("step", "request")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches.

    Attributes:
        max_batch: U-Net rows per cohort at most (a guided image takes two): every call holds
            at most this many live rows. Default: the largest of ``batch_sizes``, else 16.
        batch_sizes: The batch sizes calls are padded to. Default: the powers of two below
            ``max_batch``, and ``max_batch``.
        max_wait: Ticks a new request may wait for its cohort's next full step; when the
            wait would be longer it starts at once in a phase of its own. None: always wait
            (at most N - 1 ticks under a uniform 1:N schedule); 0: never wait (no alignment).
        max_queue: Requests waiting to start at most; one more is refused at once (``QueueFull``).
        batching: ``"step"`` (generations join and leave between steps) or ``"request"``
            (request-level batching: a cohort takes new requests only when it is empty, and
            runs them to completion together).
    """

    max_batch: int | None = None
    batch_sizes: tuple[int, ...] | None = None
    max_wait: int | None = None
    max_queue: int = 64
    batching: Literal["step", "request"] = "step"

    def __post_init__(self) -> None:
        if self.batch_sizes is not None:
            sizes = tuple(self.batch_sizes)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"batch_sizes must be ints >= 1, got {self.batch_sizes!r}")
            object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))
        max_batch = self.max_batch
        if max_batch is None:
            max_batch = self.batch_sizes[-1] if self.batch_sizes else 16
        check_int("max_batch", max_batch, 1)
        object.__setattr__(self, "max_batch", max_batch)
        if self.batch_sizes is None:
            powers = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
            object.__setattr__(self, "batch_sizes", (*powers, max_batch))
        if self.batch_sizes[-1] < max_batch:
            raise ValueError(
                f"max_batch {max_batch} is larger than the largest of batch_sizes {list(self.batch_sizes)}: "
                "a call of max_batch rows needs a batch size to run at"
            )
        if self.max_wait is not None:
            check_int("max_wait", self.max_wait, 0)
        check_int("max_queue", self.max_queue, 0)
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")

    def padded(self, rows: int) -> int:
        """Returns the batch size a call of ``rows`` live rows runs at."""
        for size in self.batch_sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the largest batch size {self.batch_sizes[-1]}")
