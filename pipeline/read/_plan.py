"""Layout arithmetic: which stored ranges hold the requested rows, in which blocks.

A plan is a list of reads, each a contiguous range of one zarr array inside one unit's
shards, and where each read's values go in the block. Reads never cross a unit, so a
chunk that fails its checksum or a shard that is missing names exactly one unit, and
reads of one block can be fetched concurrently.

Where a layer's values live, by format:

- pooled layers (every format): ``{pooling}/layer_{L}``, one row per physical slot; the
  unit of slot ``p`` is ``p // rows_per_unit``.
- tokens, formats 1 and 2: ``tokens/layer_{L}``, ``rows/token_offset`` a token slot;
  unit ``u`` owns slots ``[u * rows_per_unit * max_length, (u + 1) * ...)``.
- tokens, format 3: one packed array per unit, ``tokens/layer_{L}/{u:08d}``;
  ``rows/token_offset`` counts from the start of the row's unit's array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from actcache.schemas import store as layout

#: float32 bytes of a block when the caller does not say: large enough that per-call
#: overhead vanishes, small enough to be negligible next to a machine's memory.
BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Read:
    """One contiguous range ``[lo, hi)`` of one array, inside the shards of ``unit``."""

    unit: int
    lo: int
    hi: int
    take: np.ndarray | None
    """Offsets into ``[lo, hi)`` to keep, in output order; None keeps the whole range."""
    dest: slice | np.ndarray
    """Where the kept values go in the block: a slice, or an index per value."""


@dataclass(frozen=True)
class Plan:
    """One block: its reads and, per value, the store row and the position in the row."""

    key: Callable[[int, int], str]
    """The array key of (layer, unit)."""
    reads: tuple[Read, ...]
    rows: np.ndarray
    positions: np.ndarray | None

    def __len__(self) -> int:
        return len(self.rows)


def rows_per_block(chunk: int, row_bytes: int, block_bytes: int,
                   min_rows: int | None = None) -> int:
    """Rows per block: whole chunks while one fits ``block_bytes``; below that (small
    budgets only) a ``min_rows`` part of a chunk, so that a tight budget is not overrun."""
    chunk = max(1, chunk)
    if chunk * row_bytes > block_bytes and min_rows is not None:
        unit = min(chunk, min_rows)
        return max(unit, (block_bytes // max(1, row_bytes)) // unit * unit)
    return chunk * max(1, block_bytes // max(1, chunk * row_bytes))


def pooled_key(pooling: str) -> Callable[[int, int], str]:
    return lambda layer, unit: layout.activation_key(pooling, layer)


def token_key(manifest: dict) -> Callable[[int, int], str]:
    if layout.packed_tokens(manifest):
        return layout.token_unit_key
    return lambda layer, unit: layout.activation_key("tokens", layer)


def _runs(units: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal values in ``units``."""
    if not len(units):
        return []
    cuts = np.flatnonzero(units[1:] != units[:-1]) + 1
    edges = np.concatenate([[0], cuts, [len(units)]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _read(unit: int, starts: np.ndarray, lengths: np.ndarray,
          dest: slice | np.ndarray) -> Read:
    """The read covering ranges ``starts[i] .. + lengths[i]`` (ascending) of one unit."""
    lo, hi = int(starts[0]), int(starts[-1] + lengths[-1])
    total = int(lengths.sum())
    if total == hi - lo:  # the ranges tile [lo, hi): keep all of it
        return Read(unit, lo, hi, None, dest)
    return Read(unit, lo, hi, aranges(starts - lo, lengths), dest)


def aranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def pooled_plans(pooling: str, slots: np.ndarray, positions: np.ndarray, rpu: int,
                 block_rows: int, dest: np.ndarray | None = None) -> list[Plan]:
    """Blocks of pooled rows at physical ``slots`` (ascending, distinct), store rows
    ``positions``. Block ``b`` holds the slots in ``[b * block_rows, (b + 1) * block_rows)``,
    so blocks are chunk-aligned whenever ``block_rows`` is a whole number of chunks.

    With ``dest`` (one plan only), each row goes to ``dest[i]`` of the block rather than
    in physical order.
    """
    key = pooled_key(pooling)
    plans = []
    for a, b in _runs(slots // max(1, block_rows)):
        reads = []
        for c, d in _runs(slots[a:b] // rpu):
            part = slots[a + c:a + d]
            where: slice | np.ndarray = (slice(c, d) if dest is None else dest[a + c:a + d])
            reads.append(_read(int(part[0]) // rpu, part, np.ones(len(part), np.int64), where))
        plans.append(Plan(key, tuple(reads), positions[a:b], None))
    return plans


def token_plans(manifest: dict, slots: np.ndarray, positions: np.ndarray,
                offsets: np.ndarray, lengths: np.ndarray, block_tokens: int) -> list[Plan]:
    """Blocks of every token of the rows at physical ``slots`` (ascending, distinct), store
    rows ``positions``, whose tokens lie at ``offsets``/``lengths``; a block holds whole
    rows, cut before it would pass ``block_tokens`` (a longer row is a block alone)."""
    rpu = int(manifest["rows_per_unit"])
    if layout.packed_tokens(manifest):
        units = slots // rpu
    else:
        units = offsets // layout.token_slots_per_unit(rpu, int(manifest["max_length"]))
    ends = np.cumsum(lengths)
    plans = []
    a = 0
    while a < len(slots):
        base = int(ends[a] - lengths[a])
        b = max(a + 1, int(np.searchsorted(ends, base + block_tokens, side="right")))
        reads, at = [], 0
        for c, d in _runs(units[a:b]):
            n = int(lengths[a + c:a + d].sum())
            if n:
                reads.append(_read(int(units[a + c]), offsets[a + c:a + d],
                                   lengths[a + c:a + d], slice(at, at + n)))
            at += n
        rows = np.repeat(positions[a:b], lengths[a:b])
        pos = (np.arange(at, dtype=np.int64) - np.repeat(ends[a:b] - lengths[a:b] - base,
                                                          lengths[a:b])).astype(np.int32)
        plans.append(Plan(token_key(manifest), tuple(reads), rows, pos))
        a = b
    return plans
