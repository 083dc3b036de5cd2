"""Where ``tune`` cuts a model: a U-Net's skip branches, or a diffusion transformer's block ranges.

A *cut* is what a graph pair is built for: a branch id (an int) for a U-Net, ``(first, last)``
for a transformer (``DeepCacheConfig.cut``). The cost model needs each searched cut's FLOP
share r, which ``dcfx.branches`` measures for both kinds (``BranchInfo``, ``BlockRangeInfo``).

A transformer of L blocks has L (L + 1) / 2 block ranges, too many to measure on a real model
(Flux: 57 blocks, 1653 ranges), and each searched cut keeps a graph pair built while its
candidates are timed. Unless told otherwise the tuner searches ``first`` in 1, 2, 4, 8, ...
and ``last`` in 0, 1, 2, 4, ... (the pairs that leave a block to cache): about log2(L)^2 cuts.

Example:
    >>> cut_fields((1, 0))
    {'first': 1, 'last': 0}
    >>> cut_name({"first": 2, "last": 1, "interval": 3})
    'F2B1'
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dcfx.branches import BlockRangeInfo, BranchInfo

Cut = int | tuple[int, int]  # a U-Net's branch id, or a transformer's (first, last)


def cut_fields(cut: Cut) -> dict[str, int]:
    """Returns the ``DeepCacheConfig`` fields that name ``cut``: ``branch``, or ``first`` and ``last``."""
    if isinstance(cut, tuple):
        return {"first": cut[0], "last": cut[1]}
    return {"branch": cut}


def cut_name(config: Mapping[str, Any]) -> str:
    """Returns how reports name the cut of a config dict: the branch id ("0"), or "F1B0" (cache-dit's notation)."""
    if config.get("first") is not None:
        return f"F{config['first']}B{config.get('last') or 0}"
    return str(config.get("branch", 0))


def powers(limit: int, start: int) -> list[int]:
    """Returns ``start`` (0 or 1) and the powers of two above it, below ``limit``."""
    values = [0] if start == 0 else []
    values += [v for v in (1 << i for i in range(limit.bit_length())) if v < limit]
    return values


def block_range_grid(blocks: int, first: Sequence[int] | None, last: Sequence[int] | None) -> list[tuple[int, int]]:
    """Returns every ``(first, last)`` combination to search on a transformer of ``blocks`` blocks.

    ``first`` and ``last`` are the values combined (default: 1, 2, 4, ... and 0, 1, 2, 4, ...
    below ``blocks``). Pairs that leave no block to cache are kept: the caller says which.
    """
    firsts = powers(blocks, 1) if first is None else list(dict.fromkeys(first))
    lasts = powers(blocks, 0) if last is None else list(dict.fromkeys(last))
    return list(itertools.product(firsts, lasts))


def check_knobs(
    transformer: bool,
    count: int,
    branches: Sequence[int] | None,
    first: Sequence[int] | None,
    last: Sequence[int] | None,
) -> None:
    """Raises ValueError when the search names the other kind of cut than the model takes.

    Args:
        transformer: Whether the model is a diffusion transformer (else a U-Net).
        count: Its blocks (a transformer) or branches (a U-Net): what the message names.
        branches: The searched branch ids (``SearchSpace.branches``).
        first: The searched values of ``first``.
        last: The searched values of ``last``.
    """
    if transformer and branches is not None:
        raise ValueError(
            f"branches={list(branches)} names U-Net skip branches; this model is a diffusion transformer of "
            f"{count} blocks, cut by first= and last= (the blocks that run every step)"
        )
    if not transformer and (first is not None or last is not None):
        raise ValueError(
            f"first=/last= name a diffusion transformer's block range; this model is a U-Net, cut at a skip branch: "
            f"give branches= (valid: 0..{count - 1})"
        )


def searched_shares(
    infos: Sequence[BranchInfo | BlockRangeInfo],
    branches: Sequence[int] | None,
    first: Sequence[int] | None,
    last: Sequence[int] | None,
    log: Callable[[str], None],
) -> dict[Cut, float]:
    """Returns the FLOP share of every cut to search, from ``dcfx.branches``'s rows of the model.

    Raises:
        ValueError: branches asked of a transformer or block ranges of a U-Net (``check_knobs``),
            or cuts the model does not have (naming the valid ones).
    """
    if infos and isinstance(infos[0], BlockRangeInfo):
        ranges = {(b.first, b.last): b.flop_share for b in infos if isinstance(b, BlockRangeInfo)}
        blocks = max(f + b for f, b in ranges) + 1
        check_knobs(True, blocks, branches, first, last)
        grid = block_range_grid(blocks, first, last)
        wanted = [cut for cut in grid if cut in ranges]
        if not wanted:
            raise ValueError(
                f"no (first, last) to search: first={_listed(first)} and last={_listed(last)} leave no block to cache "
                f"on this model of {blocks} blocks (first + last must be at most {blocks - 1}; first, last >= 0)"
            )
        if len(wanted) < len(grid) and (first is not None or last is not None):
            skipped = [cut for cut in grid if cut not in ranges]
            log(f"dcfx tune: skipping (first, last) pairs that leave no block of {blocks} to cache: {skipped}")
        return {cut: ranges[cut] for cut in wanted}
    check_knobs(False, len(infos), branches, first, last)
    shares = {b.branch: b.flop_share for b in infos if isinstance(b, BranchInfo)}
    chosen = list(shares) if branches is None else list(branches)
    unknown = [b for b in chosen if b not in shares]
    if unknown:
        raise ValueError(f"branches {unknown} are not branches of this model; valid: 0..{len(shares) - 1}")
    return {b: shares[b] for b in chosen}


def _listed(values: Sequence[int] | None) -> str:
    return "default" if values is None else str(list(values))
